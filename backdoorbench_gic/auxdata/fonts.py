"""Printed digits: ``external:fonts``, a same-class source with a real shift (print against handwriting) that
needs no download.

The ten digits are rendered from the TrueType fonts inside matplotlib's wheel (``mpl-data/fonts/ttf``): DejaVu Sans,
Sans Mono and Serif and STIX General in their four weights/slants, and Computer Modern roman, bold, sans, italic and
typewriter (:data:`FONT_FILES`, 21 faces). Each image draws, from a generator seeded by ``(seed, digit, index)``:
a face, a stroke thickening (0-3 px at the 64 px rendering size), a horizontal stretch in [0.85, 1.15] and a rotation
in [-10, 10] degrees. It is then normalised as MNIST was made: the glyph's bounding box scaled (Lanczos) so its
longer side is 20 px, placed in 28 x 28 with its centre of mass at the centre, then shifted by -1, 0 or 1 px on each
axis. White on black, 8-bit. Other input sizes are resized from 28 x 28 (bilinear) and grey repeated to RGB.
The same ``(per_class, seed)`` gives the same images on every machine with the same fonts and Pillow.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)
RENDER_SIZE = 64  # points (= pixels at PIL's 72 dpi) of the first rendering, before the 20 px normalisation
MAX_STROKE = 3
STRETCH = (0.85, 1.15)
ROTATION = 10.0  # degrees, either way
BOX = 20  # MNIST: the digit's bounding box is scaled into 20 x 20 ...
SIDE = 28  # ... and centred by its centre of mass in 28 x 28
SHIFT = 1  # then moved by up to this many pixels on each axis


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def _font(name: str):
    from PIL import ImageFont

    path = font_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"external:fonts needs matplotlib's font {path}; reinstall matplotlib")
    return ImageFont.truetype(str(path), RENDER_SIZE)


def _centre(glyph: np.ndarray) -> np.ndarray:
    """MNIST's normalisation of one glyph (uint8, white on black): scale its bounding box into BOX x BOX, then
    place it in SIDE x SIDE with the centre of mass at the centre."""
    from PIL import Image

    ys, xs = np.nonzero(glyph)
    crop = glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.LANCZOS), dtype=np.float64)
    total = small.sum()
    cy = (small.sum(1) @ np.arange(nh)) / total if total else (nh - 1) / 2
    cx = (small.sum(0) @ np.arange(nw)) / total if total else (nw - 1) / 2
    top = int(np.clip(round((SIDE - 1) / 2 - cy), 0, SIDE - nh))
    left = int(np.clip(round((SIDE - 1) / 2 - cx), 0, SIDE - nw))
    out = np.zeros((SIDE, SIDE), dtype=np.float64)
    out[top:top + nh, left:left + nw] = small
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One printed ``digit`` as a 28 x 28 uint8 image, its style drawn from ``rng``."""
    from PIL import Image, ImageDraw

    font = _font(FONT_FILES[int(rng.integers(len(FONT_FILES)))])
    stroke = int(rng.integers(MAX_STROKE + 1))
    stretch = float(rng.uniform(*STRETCH))
    angle = float(rng.uniform(-ROTATION, ROTATION))
    canvas = Image.new("L", (3 * RENDER_SIZE, 3 * RENDER_SIZE))
    ImageDraw.Draw(canvas).text((RENDER_SIZE, RENDER_SIZE // 2), str(digit), font=font, fill=255,
                                stroke_width=stroke, stroke_fill=255)
    canvas = canvas.resize((round(canvas.width * stretch), canvas.height), Image.BILINEAR)
    canvas = canvas.rotate(angle, resample=Image.BILINEAR, expand=True)
    img = _centre(np.asarray(canvas, dtype=np.uint8))
    dy, dx = (int(v) for v in rng.integers(-SHIFT, SHIFT + 1, size=2))
    return np.roll(img, (dy, dx), axis=(0, 1))  # the 20 px box leaves >= 4 px of black to roll through


@functools.lru_cache(maxsize=8)
def render_digits(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` printed images of each digit: (uint8 N x 28 x 28, labels), class-major."""
    images = np.empty((10 * per_class, SIDE, SIDE), dtype=np.uint8)
    for digit in range(10):
        for i in range(per_class):
            images[digit * per_class + i] = render_digit(digit, np.random.default_rng([seed, digit, i]))
    images.setflags(write=False)
    return images, np.repeat(np.arange(10, dtype=np.int64), per_class)
