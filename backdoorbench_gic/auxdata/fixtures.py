"""Small BackdoorBenchER-style fixtures: a split dataset and a victim trained on its ``train/`` part.

:func:`backdoorbench_gic.testing.make_bb_record` makes records on plain datasets; the ``reserved`` family needs a
record whose ``clean_data`` is ``<ds>_split_<pct>_seed_<s>``, which is what BackdoorBenchER's README flow gives
(split, then attack on the split). Used by the tests and by ``benchmarks/aux_quality.py --demo``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..records import write_attack_record
from .split import make_split


def make_split_record(bb_root: str | Path, name: str = "badnet_split", dataset: str = "cifar10", *,
                      split_ratio: float = 0.2, split_seed: int = 0, model_name: str = "smallcnn",
                      width: int | None = 16,
                      train_steps: int = 80, n_train: int = 200, n_test: int = 60, target: int = 0, ratio: float = 0.1,
                      trigger_size: int = 8, seed: int = 0, make_data: bool = True) -> Path:
    """A BackdoorBench root with ``data/<dataset>`` (a generated fixture unless ``make_data`` is False, e.g. for the
    system's Fashion-MNIST), ``data/<dataset>_split_<pct>_seed_<s>/`` and ``record/<name>/`` whose victim was
    trained (Adam, batch 64, ``train_steps`` steps) on the split's train part with a BadNets patch."""
    from ..data.datasets import open_dataset
    from ..models import build_model
    from ..testing import badnet_patch, make_cifar10, make_mnist_like, poison_splits

    bb_root = Path(bb_root)
    if make_data:
        if dataset == "cifar10":
            make_cifar10(bb_root / "data" / dataset, n_train, n_test, seed)
        elif dataset in ("mnist", "fashion-mnist"):
            make_mnist_like(bb_root / "data" / dataset, "MNIST" if dataset == "mnist" else "FashionMNIST", n_train,
                            n_test, seed)
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
        _train(model, train, bd_train, train_steps, seed)
    return write_attack_record(bb_root, name, model_name=model_name, num_classes=ds.spec.num_classes,
                               state_dict=model.net.state_dict(), clean_data=split_dir.name,
                               img_size=ds.spec.input_shape, bd_train=bd_train, bd_test=bd_test)


def _train(model: torch.nn.Module, train: ImageSet, bd_train, steps: int, seed: int) -> None:
    """Adam on clean + poisoned samples (the poison oversampled so a few steps implant the backdoor)."""
    from ..data.transforms import nhwc_to_nchw

    idx = np.array(sorted(bd_train.images), dtype=np.int64)
    poisoned = ImageSet(nhwc_to_nchw(np.stack([bd_train.images[int(i)] for i in idx])),
                        [bd_train.labels[int(i)][0] for i in idx], None, None, idx)
    full = ImageSet.concat([train, poisoned, poisoned])
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
