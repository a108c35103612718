"""``bbgic`` subcommands, one module each, plus the argument groups they share."""
