"""Distribution shifts of the auxiliary images: BackdoorBenchER's OOD transforms with their exact parameters,
JPEG re-encoding, and any composition of torchvision transforms.

Each image is transformed once, with its own random parameters, from a generator seeded by
``(shift_seed, shift name, position in the pool)``: the result for an image does not depend on which other
images are drawn, so sampling then shifting equals shifting the whole pool then sampling (and equals the
on-disk set :func:`backdoorbench_gic.auxdata.layout.export_reserved_shift` writes). The shift seed is a property of
the shifted *dataset*, as BackdoorBenchER's offline sets are; the run seed only chooses which images are drawn.

Parameters (BackdoorBenchER's, gic-method.md section 2):

=================  ==========================================================================================
``brightness``     factor ~ U[0.5, 1.5]; ``x * f`` clipped to [0, 1]
``contrast``       factor ~ U[0.5, 1.5]; blend with the mean grey level (torchvision's adjust_contrast)
``color_jitter``   brightness, contrast, saturation ~ U[0.5, 1.5], hue ~ U[-0.5, 0.5], in a random order
                   (torchvision's ColorJitter); saturation and hue do nothing on grey-scale images
``gaussian_blur``  kernel 3, sigma ~ U[0.1, 2.0] (same sigma on both axes, reflect padding)
``rotation``       angle ~ U[-30, 30] degrees, nearest-neighbour, black fill
``noise``          ``x + std * N(0, 1)`` per pixel, std 0.1, clipped to [0, 1]
``noise_wrap``     the same noise draws, pixels wrapped around as BackdoorBenchER's generator leaves them
``jpeg``           JPEG re-encoding at ``jpeg_quality`` (default 50; PIL, 4:2:0 chroma sub-sampling)
``tv``             any torchvision ``transforms.v2`` classes by name: ``Name(kw=literal, ...)|Name2(...)``
=================  ==========================================================================================

Results are quantised back to 8 bits as the PNGs BackdoorBenchER saves: by default pixels are clipped to
[0, 1] and rounded. BackdoorBenchER does not clip its noisy images, and its float-to-PNG conversion
(``ToPILImage``: ``x.mul(255).byte()``) truncates toward zero and keeps the low 8 bits, so out-of-range values
wrap around (-0.01 -> 254, 1.05 -> 11): about a third of the pixels of a dark or bright image jump to the other
end of the range, salt-and-pepper noise rather than Gaussian noise. The two are distinct named sets, never chosen
by what is on disk: ``reserved_noise`` is the clipped one; ``reserved_noise_wrap`` reproduces BackdoorBenchER's
exactly (and reads their ``reserved_noise/`` folder, which holds that data). Both draw the same noise per image
(seed key ``noise``), so they differ in what happens outside [0, 1] and, inside it, by one level at most (their
conversion truncates, ours rounds); :data:`WRAP_WARNING` is the line every summary prints for the wrapped set.
"""
from __future__ import annotations

import ast
import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SHIFT_NAMES = ("brightness", "contrast", "color_jitter", "gaussian_blur", "rotation", "noise", "noise_wrap", "jpeg",
               "tv")
ER_SHIFTS = ("brightness", "contrast", "color_jitter", "gaussian_blur", "rotation", "noise")
# the folder BackdoorBenchER's generate_ood.py writes for a shift (their only noise is the wrapped one)
ER_FOLDER = {"noise_wrap": "reserved_noise"}
WRAP_WARNING = ("reserved_noise_wrap: BackdoorBenchER's noisy images, pixels wrapped around instead of clipped "
                "(x.mul(255).byte() keeps the low 8 bits): salt-and-pepper extremes, not Gaussian noise; "
                "reserved_noise is the clipped set")


def seed_key(name: str, arg: str | None = None) -> str:
    """The name a shift's per-image parameters are seeded by: ``noise_wrap`` shares ``noise``'s draws."""
    if name == "tv":
        return f"tv:{arg}"
    return "noise" if name == "noise_wrap" else name


def shift_warning(reserved_type: str) -> str | None:
    """:data:`WRAP_WARNING` when ``reserved_type`` (or a part of a ``mix:``) is the wrapped noise set."""
    return WRAP_WARNING if "reserved_noise_wrap" in str(reserved_type) else None


# ---------------------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, mode: str = "clamp") -> torch.Tensor:
    """float pixels -> uint8. ``clamp``: clip to [0, 1] and round to the nearest level. ``wrap``: what
    ``x.mul(255).byte()`` does (truncate toward zero, keep the low 8 bits), BackdoorBenchER's PNG path."""
    if mode == "clamp":
        return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if mode == "wrap":
        v = torch.trunc(x.double() * 255.0).to(torch.int64)
        return torch.remainder(v, 256).to(torch.uint8)
    raise ValueError(f"quantisation mode must be 'clamp' or 'wrap', got {mode!r}")


def image_seed(shift_seed: int, key: str, position: int) -> int:
    """A 63-bit seed from (shift seed, shift name, pool position); stable across platforms and Python runs."""
    h = hashlib.blake2b(f"{int(shift_seed)}|{key}|{int(position)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item())


def _pair(v: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {v!r}") from None
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {v!r}")
    return lo, hi


# ---------------------------------------------------------------------------------------------------------
# the shifts: each maps one float C x H x W image in [0,1] plus its generator to a float image
# ---------------------------------------------------------------------------------------------------------
class Shift:
    """Base: ``__call__(x, g)`` returns the shifted float image (may leave [0, 1] only for ``noise``)."""

    name = "shift"
    quantize_mode = "clamp"

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


class _FactorShift(Shift):
    """One factor per image drawn uniformly from ``factor_range``, applied by torchvision's ``adjust_<name>``."""

    def __init__(self, factor_range=(0.5, 1.5)):
        self.factor_range = _pair(factor_range, "factor_range")

    def __call__(self, x, g):
        from torchvision.transforms.v2 import functional as F

        return getattr(F, f"adjust_{self.name}")(x, _uniform(g, *self.factor_range))


class Brightness(_FactorShift):
    name = "brightness"


class Contrast(_FactorShift):
    name = "contrast"


class ColorJitter(Shift):
    name = "color_jitter"

    def __init__(self, brightness=(0.5, 1.5), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.5, 0.5)):
        self.brightness = _pair(brightness, "brightness")
        self.contrast = _pair(contrast, "contrast")
        self.saturation = _pair(saturation, "saturation")
        self.hue = _pair(hue, "hue")
        if not (-0.5 <= self.hue[0] and self.hue[1] <= 0.5):
            raise ValueError(f"hue must lie within [-0.5, 0.5], got {hue!r}")

    def __call__(self, x, g):
        from torchvision.transforms.v2 import functional as F

        order = torch.randperm(4, generator=g).tolist()
        b, c, s, h = (_uniform(g, *self.brightness), _uniform(g, *self.contrast), _uniform(g, *self.saturation),
                      _uniform(g, *self.hue))
        ops = {0: lambda t: F.adjust_brightness(t, b), 1: lambda t: F.adjust_contrast(t, c),
               2: lambda t: F.adjust_saturation(t, s), 3: lambda t: F.adjust_hue(t, h)}
        for i in order:
            x = ops[i](x)
        return x


class GaussianBlur(Shift):
    name = "gaussian_blur"

    def __init__(self, kernel_size: int = 3, sigma_range=(0.1, 2.0)):
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.sigma_range = _pair(sigma_range, "sigma_range")

    def __call__(self, x, g):
        from torchvision.transforms.v2 import functional as F

        s = _uniform(g, *self.sigma_range)
        return F.gaussian_blur(x, [self.kernel_size, self.kernel_size], [s, s])


class Rotation(Shift):
    name = "rotation"

    def __init__(self, degrees=(-30.0, 30.0), interpolation: str = "nearest"):
        self.degrees = _pair(degrees, "degrees")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be nearest or bilinear, got {interpolation!r}")
        self.interpolation = interpolation

    def __call__(self, x, g):
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode.NEAREST if self.interpolation == "nearest" else InterpolationMode.BILINEAR
        return F.rotate(x, _uniform(g, *self.degrees), interpolation=mode, fill=0.0)


class Noise(Shift):
    name = "noise"

    def __init__(self, std: float = 0.1, wrap: bool = False):
        if not float(std) >= 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = float(std)
        self.wrap = bool(wrap)

    @property
    def quantize_mode(self) -> str:  # type: ignore[override]
        return "wrap" if self.wrap else "clamp"

    def __call__(self, x, g):
        return add_noise(x, torch.randn(x.shape, generator=g, dtype=torch.float32), self.std)


def add_noise(x: torch.Tensor, noise: torch.Tensor, std: float) -> torch.Tensor:
    """``x + std * noise`` with no clipping (quantisation decides between clipping and wrapping)."""
    return x + float(std) * noise


class JPEG(Shift):
    name = "jpeg"

    def __init__(self, quality: int = 50):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(self, x, g):
        from PIL import Image

        arr = quantize(x).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            out = np.asarray(dec.convert("L" if arr.shape[2] == 1 else "RGB"), dtype=np.uint8)
        out = out.reshape(arr.shape)
        return torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255.0


# ---------------------------------------------------------------------------------------------------------
# torchvision compositions: "Name(kw=literal)|Name2(...)"
# ---------------------------------------------------------------------------------------------------------
_UINT8_ONLY = {"JPEG", "RandomPosterize", "RandomEqualize"}


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_tv_spec(spec: str) -> list[tuple[str, tuple, dict]]:
    """``"RandomErasing(p=1.0, scale=(0.02, 0.1))|GaussianBlur(3)"`` -> [(name, args, kwargs), ...]; only
    literals are accepted as arguments, and only classes of ``torchvision.transforms.v2``."""
    import torchvision.transforms.v2 as T

    steps = []
    for part in _split_top(spec, "|"):
        if not part:
            raise ValueError(f"empty transform in {spec!r} (compose with '|': Name(...)|Name(...))")
        try:
            node = ast.parse(part if "(" in part else part + "()", mode="eval").body
        except SyntaxError as exc:
            raise ValueError(f"cannot parse torchvision transform {part!r}: {exc.msg}") from None
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError(f"{part!r} is not Name(arguments)")
        name = node.func.id
        cls = getattr(T, name, None)
        if not (isinstance(cls, type) and issubclass(cls, T.Transform)):
            known = sorted(n for n in dir(T)
                           if isinstance(getattr(T, n), type) and issubclass(getattr(T, n), T.Transform))
            raise ValueError(f"{name!r} is not a torchvision.transforms.v2 transform; known: {', '.join(known)}")
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            raise ValueError(f"arguments of {part!r} must be Python literals (numbers, strings, tuples)") from None
        steps.append((name, args, kwargs))
    return steps


class TorchvisionShift(Shift):
    name = "tv"

    def __init__(self, spec: str):
        import torchvision.transforms.v2 as T

        self.spec = str(spec)
        steps = parse_tv_spec(self.spec)
        try:
            self._transform = T.Compose([getattr(T, n)(*a, **kw) for n, a, kw in steps])
        except TypeError as exc:
            raise ValueError(f"cannot build {self.spec!r}: {exc}") from None
        self._uint8 = any(n in _UINT8_ONLY for n, _, _ in steps)

    def __call__(self, x, g):
        seed = int(torch.randint(0, 2**62, (), generator=g).item())
        inp = quantize(x) if self._uint8 else x
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(seed)
            out = self._transform(inp)
        out = torch.as_tensor(out)
        if out.shape != x.shape:
            raise ValueError(f"torchvision shift {self.spec!r} changed the image shape {tuple(x.shape)} -> "
                             f"{tuple(out.shape)}; auxiliary images must keep the victim's input size")
        out = out.float() / 255.0 if out.dtype == torch.uint8 else out.float()
        return out.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# building shifts from names and options, and applying them to a batch of pool images
# ---------------------------------------------------------------------------------------------------------
# option name -> (default, help); shared by the reserved_<shift> sources and the export helper
SHIFT_OPTIONS: dict[str, tuple[Any, str]] = {
    "shift_seed": (0, "seed of the per-image shift parameters (a property of the shifted set; the run seed only "
                      "chooses which images are drawn)"),
    "shift_base": ("reserved", "the images to shift: 'reserved' (BackdoorBenchER) or 'train' (for records without a "
                               "reserved split; those images were seen in training)"),
    "precomputed": ("auto", "'auto': read data/<split>/reserved_<shift>/ when it exists (and, if shift options are "
                            "given, was exported with them), else shift on the fly; 'never': always shift on the fly; "
                            "'always': require the folder"),
    "quantize": (True, "round the shifted images to 8 bits as BackdoorBenchER's PNGs (False keeps float32)"),
    "brightness_range": ((0.5, 1.5), "brightness factor range"),
    "contrast_range": ((0.5, 1.5), "contrast factor range"),
    "saturation_range": ((0.5, 1.5), "color_jitter saturation range"),
    "hue_range": ((-0.5, 0.5), "color_jitter hue range"),
    "blur_kernel": (3, "gaussian_blur kernel size"),
    "blur_sigma_range": ((0.1, 2.0), "gaussian_blur sigma range"),
    "rotation_degrees": ((-30.0, 30.0), "rotation angle range"),
    "rotation_interpolation": ("nearest", "rotation resampling: nearest (torchvision's default) or bilinear"),
    "noise_std": (0.1, "noise standard deviation on [0,1] pixels"),
    "jpeg_quality": (50, "JPEG quality 1..100"),
}


def make_shift(name: str, options: dict[str, Any] | None = None, arg: str | None = None) -> Shift:
    """A shift by name (``brightness`` ... ``jpeg``, ``tv`` with its spec as ``arg``), configured by options."""
    o = {k: v[0] for k, v in SHIFT_OPTIONS.items()}
    o.update(options or {})
    n = name.lower()
    if n == "brightness":
        return Brightness(o["brightness_range"])
    if n == "contrast":
        return Contrast(o["contrast_range"])
    if n == "color_jitter":
        return ColorJitter(o["brightness_range"], o["contrast_range"], o["saturation_range"], o["hue_range"])
    if n == "gaussian_blur":
        return GaussianBlur(o["blur_kernel"], o["blur_sigma_range"])
    if n == "rotation":
        return Rotation(o["rotation_degrees"], o["rotation_interpolation"])
    if n in ("noise", "noise_wrap"):
        return Noise(o["noise_std"], wrap=n == "noise_wrap")
    if n == "jpeg":
        return JPEG(int(arg) if arg else o["jpeg_quality"])
    if n == "tv":
        if not arg:
            raise ValueError("the tv shift needs a spec: reserved_tv:Name(kw=value)|Name2(...)")
        return TorchvisionShift(arg)
    raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFT_NAMES)}")


@dataclass
class ShiftApplier:
    """Applies one shift to chosen pool images: per-image generators, quantisation, progress."""

    shift: Shift
    key: str  # the shift's name in the seed (reserved_tv specs include their spec)
    shift_seed: int = 0
    quantize: bool = True

    def __call__(self, images: torch.Tensor, positions: np.ndarray, progress: bool | None = None) -> torch.Tensor:
        from ..utils.logs import progress_enabled
        from ..utils.progress import progress_bar

        n = images.shape[0]
        if len(positions) != n:
            raise ValueError(f"{n} images for {len(positions)} positions")
        out = torch.empty(images.shape, dtype=torch.uint8 if self.quantize else torch.float32)
        it = range(n)
        if n >= 500:
            it = progress_bar(it, desc=f"shift {self.key}", leave=False, disable=not progress_enabled(progress))
        for i in it:
            x = images[i]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            g = torch.Generator().manual_seed(image_seed(self.shift_seed, self.key, int(positions[i])))
            y = self.shift(x, g)
            if self.quantize:
                out[i] = quantize(y, self.shift.quantize_mode)
            else:
                out[i] = y.clamp(0.0, 1.0)
        return out


def shift_images(images: torch.Tensor, name: str, *, positions: np.ndarray | None = None, shift_seed: int = 0,
                 options: dict[str, Any] | None = None, arg: str | None = None, quantize: bool = True) -> torch.Tensor:
    """Shift a batch (uint8 or float N x C x H x W); ``positions`` (default 0..N-1) key each image's parameters."""
    shift = make_shift(name, options, arg)
    pos = np.arange(images.shape[0]) if positions is None else np.asarray(positions)
    return ShiftApplier(shift, seed_key(name, arg), shift_seed, quantize)(images, pos)

