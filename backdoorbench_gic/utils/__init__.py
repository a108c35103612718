"""Small shared helpers: atomic file writes, device and seed handling, run logging."""
