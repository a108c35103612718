import numpy as np
import pytest
import torch

from backdoorbench_gic.data.datasets import (DatasetNotFoundError, SYSTEM_FASHION_MNIST, open_dataset, read_idx)
from backdoorbench_gic.data.specs import get_spec, split_name
from backdoorbench_gic.testing import (class_images, make_cifar10, make_gtsrb, make_mnist_like, make_tiny,
                                       write_image_folder, write_idx)


def test_cifar10_pickles_keep_batch_order_and_pixels(tmp_path):
    make_cifar10(tmp_path / "cifar10", n_train=50, n_test=20, seed=3)
    ds = open_dataset("cifar10", directory=tmp_path / "cifar10")
    x, y = class_images(50, 10, 32, 32, 3, 3)
    assert ds.train.images.shape == (50, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert torch.equal(ds.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.train.labels.tolist() == y.tolist()
    assert len(ds.test) == 20


def test_cifar100_fine_labels(tmp_path):
    make_cifar10(tmp_path / "cifar100", n_train=200, n_test=100, num_classes=100, cifar100=True)
    ds = open_dataset("cifar100", directory=tmp_path / "cifar100")
    assert ds.spec.num_classes == 100 and int(ds.train.labels.max()) == 99


def _pickle_key_types(path):
    import pickle

    with open(path, "rb") as fh:
        return {type(k) for k in pickle.load(fh, encoding="bytes")}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_pickles_with_str_keys_read_like_bytes_keys(tmp_path, dataset):
    """Python 3 writers store "data"/"labels" as str, the official files as bytes: both give the same images."""
    c100 = dataset == "cifar100"
    make_cifar10(tmp_path / "b" / dataset, n_train=100, n_test=20, num_classes=100 if c100 else 10, cifar100=c100)
    make_cifar10(tmp_path / "s" / dataset, n_train=100, n_test=20, num_classes=100 if c100 else 10, cifar100=c100,
                 str_keys=True)
    folder = "cifar-100-python/train" if c100 else "cifar-10-batches-py/data_batch_1"
    assert _pickle_key_types(tmp_path / "b" / dataset / folder) == {bytes}
    assert _pickle_key_types(tmp_path / "s" / dataset / folder) == {str}
    by_bytes = open_dataset(dataset, directory=tmp_path / "b" / dataset)
    by_str = open_dataset(dataset, directory=tmp_path / "s" / dataset)
    for split in ("train", "test"):
        assert torch.equal(by_str.split(split).images, by_bytes.split(split).images)
        assert torch.equal(by_str.split(split).labels, by_bytes.split(split).labels)


def test_cifar_pickle_without_data_key_names_the_keys_it_has(tmp_path):
    import pickle

    make_cifar10(tmp_path / "cifar10", n_train=10, n_test=10)
    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"pixels": np.zeros((10, 3072), np.uint8), "labels": [0] * 10}, fh)
    with pytest.raises(ValueError, match=r"needs the key 'data' \(as str or bytes\); it has 'labels', 'pixels'"):
        _ = open_dataset("cifar10", directory=tmp_path / "cifar10").test


def test_bb_record_over_str_key_cifar_loads_and_reproduces_its_metrics(tmp_path):
    """A BackdoorBench record whose CIFAR-10 folder was written by Python 3 (str keys): the record's logged
    attack_df_summary.csv row is reproduced exactly, as it is over the official bytes-key files."""
    from backdoorbench_gic.inspection import inspect_record
    from backdoorbench_gic.testing import make_bb_record

    record = make_bb_record(tmp_path, "badnet_strkeys", n_train=100, n_test=40, train_steps=20,
                            model_name="smallcnn", width=8, trigger_size=8)
    data_dir = tmp_path / "data" / "cifar10"
    before = open_dataset("cifar10", directory=data_dir)
    x_bytes, y_bytes = before.train.images.clone(), before.train.labels.clone()
    make_cifar10(data_dir, n_train=100, n_test=40, seed=0, str_keys=True)  # the same images, re-written with str keys
    assert _pickle_key_types(data_dir / "cifar-10-batches-py" / "test_batch") == {str}
    from backdoorbench_gic.data.datasets import clear_dataset_cache

    clear_dataset_cache()
    after = open_dataset("cifar10", directory=data_dir)
    assert torch.equal(after.train.images, x_bytes) and torch.equal(after.train.labels, y_bytes)
    report = inspect_record(record, evaluate=True)
    assert report.valid, report.render()
    assert "evaluated" in report.facts and "logged (attack_df_summary.csv, last)" in report.facts


def test_dataset_pickle_with_foreign_global_is_refused(tmp_path):
    import os
    import pickle

    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    make_cifar10(tmp_path / "cifar10", n_train=10, n_test=10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        _ = open_dataset("cifar10", directory=tmp_path / "cifar10").train


def test_idx_reader_and_fashion_mnist_torchvision_layout(tmp_path):
    make_mnist_like(tmp_path / "fashion-mnist", "FashionMNIST", n_train=30, n_test=10)
    ds = open_dataset("fashion-mnist", directory=tmp_path / "fashion-mnist")
    assert ds.train.images.shape == (30, 1, 28, 28) and len(ds.test) == 10
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.idx", arr)
    assert np.array_equal(read_idx(tmp_path / "x.idx"), arr)


@pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    ds = open_dataset("fashion-mnist", directory=tmp_path / "absent")
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.train.class_counts(10).tolist() == [6000] * 10


def test_fashion_mnist_3x32_pads_and_repeats(tmp_path):
    make_mnist_like(tmp_path / "fm", "FashionMNIST", n_train=20, n_test=10)
    small = open_dataset("fashion-mnist", directory=tmp_path / "fm").train
    big = open_dataset("fashion-mnist-3x32", directory=tmp_path / "fm").train
    assert big.images.shape == (20, 3, 32, 32)
    assert torch.equal(big.images[:, 0, 2:30, 2:30], small.images[:, 0])
    assert torch.equal(big.images[:, 1], big.images[:, 0]) and big.images[:, :, :2].sum() == 0


def test_gtsrb_layout_resizes_in_csv_order(tmp_path):
    make_gtsrb(tmp_path / "gtsrb", per_class_train=2, n_test=43)
    ds = open_dataset("gtsrb", directory=tmp_path / "gtsrb")
    assert ds.train.images.shape == (86, 3, 32, 32)
    assert ds.train.labels.tolist() == sorted(ds.train.labels.tolist())  # class-major, as the CSVs list them
    assert len(ds.test) == 43


def test_tiny_layout(tmp_path):
    make_tiny(tmp_path / "tiny", num_classes=200, per_class_train=1, n_val=10)
    ds = open_dataset("tiny", directory=tmp_path / "tiny")
    assert ds.train.images.shape == (200, 3, 64, 64) and ds.train.labels.tolist() == list(range(200))
    assert len(ds.test) == 10


def test_split_dataset_is_image_folder_order(tmp_path):
    name = split_name("cifar10", 5, 0)
    root = tmp_path / name
    x, y = class_images(30, 10, 32, 32, 3, 0)
    write_image_folder(root / "train", x, y)
    write_image_folder(root / "test", x[:10], y[:10], start_index=100)
    write_image_folder(root / "reserved", x[:5], y[:5])
    ds = open_dataset(name, directory=root)
    assert ds.spec == get_spec("cifar10")
    # ImageFolder order: class folders sorted, then file names: labels come out sorted
    assert ds.train.labels.tolist() == sorted(y.tolist())
    order = np.argsort(y, kind="stable")
    assert torch.equal(ds.train.images, torch.from_numpy(x[order]).permute(0, 3, 1, 2))
    assert len(ds.split("reserved")) == 5


def test_digits_split_is_fixed_and_stratified():
    ds = open_dataset("digits")
    assert len(ds.train) + len(ds.test) == 1797
    assert ds.train.images.shape[1:] == (1, 16, 16)
    counts = ds.test.class_counts(10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = open_dataset("digits", directory="/elsewhere")
    assert torch.equal(again.test.images, ds.test.images)


def test_missing_data_names_every_path_searched(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        _ = open_dataset("cifar10", directory=tmp_path / "nowhere").train
    msg = str(exc.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DatasetNotFoundError) as exc:
        _ = open_dataset("mnist", directory=tmp_path / "none").train
    assert str(tmp_path / "none" / "MNIST" / "raw") in str(exc.value)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(KeyError, match="Known datasets: cifar10"):
        open_dataset("imagenet21k")


def test_gtsrb_writer_round_trips_exactly_and_lists_empty_classes(tmp_path):
    from backdoorbench_gic.data.datasets import GTSRB

    rng = np.random.RandomState(0)
    x, y = rng.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.array([0, 0, 1, 1, 2, 2])
    xt, yt = rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([2, 0, 1, 2])
    GTSRB.write(tmp_path / "gtsrb", (x, y), (xt, yt))
    ds = open_dataset("gtsrb", directory=tmp_path / "gtsrb")
    assert torch.equal(ds.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))  # 32 x 32: no resize, lossless
    assert ds.train.labels.tolist() == y.tolist() and ds.test.labels.tolist() == yt.tolist()
    assert torch.equal(ds.test.images, torch.from_numpy(xt).permute(0, 3, 1, 2))
    empty = (tmp_path / "gtsrb" / "Train" / "00042" / "GT-00042.csv").read_text()
    assert empty == "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"  # a class without images
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 43\)"):
        GTSRB.write(tmp_path / "bad", (x, np.array([0, 0, 1, 1, 2, 43])), (xt, yt))
