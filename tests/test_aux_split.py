"""BackdoorBenchER split folders (exact layout, index files, reload, resume) and the reserved family on them."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from backdoorbench_gic.auxdata import AuxDataError, build_aux_set, export_reserved_shift, make_split
from backdoorbench_gic.auxdata.split import read_split_index
from backdoorbench_gic.data.datasets import clear_dataset_cache, open_dataset
from backdoorbench_gic.testing import make_cifar10

SPLIT = "cifar10_split_20_seed_0"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    make_cifar10(root / "data" / "cifar10", n_train=100, n_test=30, seed=0)  # 10 per class
    make_split("cifar10", 0.2, 0, bb_root=root, progress=False)
    return root


def test_layout_and_index_files_are_exact(root):
    out = root / "data" / SPLIT
    src = open_dataset("cifar10", bb_root=root)
    train, test = src.train, src.test
    lists = {s: read_split_index(out / f"{s}_idx.txt", s) for s in ("train", "reserved", "test")}
    # floor(0.2 * 10) = 2 reserved per class
    assert np.bincount(lists["reserved"].labels).tolist() == [2] * 10
    assert len(lists["train"].original) == 80 and len(lists["test"].original) == 30
    assert not set(lists["train"].original) & set(lists["reserved"].original)
    assert sorted(set(lists["train"].original) | set(lists["reserved"].original)) == list(range(100))
    first = (out / "reserved_idx.txt").read_text().splitlines()[0].split()
    assert first[0] == "0" and first[3] == "reserved" and int(first[2]) == 0
    assert lists["test"].original.tolist() == list(range(30))  # test keeps the original order
    for s in ("train", "reserved"):
        assert np.all(np.diff(lists[s].labels) >= 0)  # class-major
        names = sorted(p.relative_to(out / s).as_posix() for p in (out / s).rglob("*.png"))
        assert names == sorted(f"{y:05d}/{i:05d}.png" for i, y in enumerate(lists[s].labels))
    assert (out / "test" / f"{int(test.labels[17]):05d}" / "00017.png").is_file()
    meta = (out / "meta.txt").read_text()
    for line in ("num_classes: 10", "input_size: 32x32x3", "split_ratio: 0.2", "seed: 0", "train: 80", "reserved: 20",
                 "test: 30"):
        assert line in meta
    # read back through BackdoorBenchER's ImageFolder loader: positions = new_i, pixels exact
    ds = open_dataset(SPLIT, bb_root=root)
    for s, base in (("train", train), ("reserved", train)):
        view = ds.split(s)
        assert view.labels.tolist() == lists[s].labels.tolist()
        assert torch.equal(view.images, base.images[lists[s].original])
    tv = ds.test  # ImageFolder order is class-major; file numbers are original test indices
    order = sorted(range(30), key=lambda i: (int(test.labels[i]), i))
    assert torch.equal(tv.images, test.images[order])


def test_reload_resume_and_mismatch(root, tmp_path):
    out = root / "data" / SPLIT
    victim = sorted((out / "train").rglob("*.png"))[5]
    victim.unlink()
    (out / "meta.txt").unlink()  # looks like an interrupted run
    assert make_split("cifar10", 0.2, 0, bb_root=root, progress=False) == out
    assert victim.is_file() and (out / "meta.txt").is_file()
    with pytest.raises(AuxDataError, match="split_ratio 0.2"):
        make_split("cifar10", 0.2, 1, bb_root=root, out_dir=out, progress=False)
    # hand-written index files are honoured: reserve the first two images of class 0 only
    custom = tmp_path / "custom"
    custom.mkdir()
    src = open_dataset("cifar10", bb_root=root).train
    y = src.labels.numpy()
    c0 = np.flatnonzero(y == 0)[:2]
    rest = [i for i in np.lexsort((np.arange(100), y)) if i not in c0]
    (custom / "reserved_idx.txt").write_text("".join(f"{i} {o} 0 reserved\n" for i, o in enumerate(c0)))
    (custom / "train_idx.txt").write_text("".join(f"{i} {o} {y[o]} train\n" for i, o in enumerate(rest)))
    (custom / "test_idx.txt").write_text("".join(f"{i} {i} {t} test\n" for i, t in enumerate(
        open_dataset("cifar10", bb_root=root).test.labels.tolist())))
    make_split("cifar10", 0.2, 0, bb_root=root, out_dir=custom, progress=False)
    reserved = sorted(p.relative_to(custom / "reserved").as_posix() for p in (custom / "reserved").rglob("*.png"))
    assert reserved == ["00000/00000.png", "00000/00001.png"]


def test_interrupted_run_does_not_look_complete(root, tmp_path, monkeypatch):
    import backdoorbench_gic.auxdata.split as split_mod

    real = split_mod.atomic_save_png
    calls = {"n": 0}

    def dying(arr, path):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt("killed")
        return real(arr, path)

    monkeypatch.setattr(split_mod, "atomic_save_png", dying)
    out = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        make_split("cifar10", 0.2, 0, bb_root=root, out_dir=out, progress=False)
    assert not (out / "meta.txt").exists() and (out / "train_idx.txt").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written files left
    monkeypatch.setattr(split_mod, "atomic_save_png", real)
    make_split("cifar10", 0.2, 0, bb_root=root, out_dir=out, progress=False)
    ref = root / "data" / SPLIT
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*.png")) and len(files) == 130
    assert all((out / f).read_bytes() == (ref / f).read_bytes() for f in files[::7])


def test_cli_split_with_shifted_sets(root, capsys):
    from backdoorbench_gic.cli import main

    assert main(["split", "--dataset", "cifar10", "--split_ratio", "0.2", "--bb_root", str(root), "--ood_types",
                 "noise", "brightness", "--no_progress"]) == 0
    out = root / "data" / SPLIT
    for t in ("reserved_noise", "reserved_brightness"):
        names = sorted(p.relative_to(out / t).as_posix() for p in (out / t).rglob("*.png"))
        assert names == sorted(p.relative_to(out / "reserved").as_posix() for p in (out / "reserved").rglob("*.png"))
        assert "ood_type" in (out / t / "meta.txt").read_text()
    assert main(["split", "--dataset", "cifar10", "--bb_root", str(root), "--split_ratio", "0.2",
                 "--ood_types", "fog"]) == 2
    assert "unknown --ood_types value 'fog'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def split_record(root):
    from backdoorbench_gic.testing import make_split_record
    from backdoorbench_gic.records import load_attack_record

    rd = make_split_record(root, "badnet_split", "cifar10", split_ratio=0.2, train_steps=0, make_data=False,
                           width=8)
    return load_attack_record(rd)


def test_reserved_source_on_a_split_record(split_record):
    aux = build_aux_set(split_record, "reserved", ratio=0.2)  # ratio_c = 0.2 * 80 / 20 = 0.8 -> floor(1.6) = 1
    assert len(aux) == 10 and aux.class_counts(10).tolist() == [1] * 10 and aux.source_names == ["reserved"]
    reserved = split_record.dataset().split("reserved")
    assert torch.equal(aux.images, reserved.images[aux.indices])
    with pytest.raises(AuxDataError, match=r"has 2 image\(s\) of class 0 but the sampling rule asks for 3"):
        build_aux_set(split_record, "reserved", n_per_class=3)


def test_precomputed_shift_folder_equals_on_the_fly(split_record, root):
    out = root / "data" / SPLIT
    export_reserved_shift(out, "rotation", options={"shift_seed": 4})
    clear_dataset_cache()
    on_disk = build_aux_set(split_record, "reserved_rotation", ratio=None)  # reads the folder (shift seed 4)
    fly = build_aux_set(split_record, "reserved_rotation", ratio=None,
                        options={"shift_seed": 4, "precomputed": "never"})
    assert torch.equal(on_disk.images, fly.images) and torch.equal(on_disk.indices, fly.indices)
    other = build_aux_set(split_record, "reserved_rotation", ratio=None,
                          options={"shift_seed": 5, "precomputed": "never"})
    assert not torch.equal(fly.images, other.images)
    with pytest.raises(AuxDataError, match="precomputed='always'"):
        build_aux_set(split_record, "reserved_contrast", ratio=None, options={"precomputed": "always"})
    # an unfinished export of ours is refused, not read
    os.remove(out / "reserved_rotation" / "meta.txt")
    with pytest.raises(AuxDataError, match="unfinished export"):
        build_aux_set(split_record, "reserved_rotation", ratio=None)
    export_reserved_shift(out, "rotation", options={"shift_seed": 4})  # completes it
    with pytest.raises(AuxDataError, match="other parameters"):
        os.remove(out / "reserved_rotation" / "meta.txt")
        export_reserved_shift(out, "rotation", options={"shift_seed": 9})


def test_folder_types_read_er_sets(split_record, root):
    from backdoorbench_gic.testing import class_images, write_image_folder

    x, y = class_images(20, 10, 32, 32, 3, seed=3)
    write_image_folder(root / "data" / SPLIT / "reserved_imagenet", x, y)
    aux = build_aux_set(split_record, "reserved_imagenet", ratio=None)
    assert len(aux) == 20 and aux.source_names == ["reserved_imagenet"]
    assert sorted(aux.labels.tolist()) == sorted(y.tolist())
    with pytest.raises(AuxDataError, match="unknown auxiliary type 'reserved_fog'.*reserved_noise"):
        build_aux_set(split_record, "reserved_fog", ratio=None)


def test_reserved_on_a_plain_record_explains_how_to_get_one(tmp_path):
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    rec = load_attack_record(make_bb_record(tmp_path, "plain", "cifar10", n_train=40, n_test=20,
                                            model_name="smallcnn", width=8))
    with pytest.raises(AuxDataError, match=r"bbgic split --dataset cifar10 --split_ratio 0.05.*retrain"):
        build_aux_set(rec, "reserved_noise")
    aux = build_aux_set(rec, "reserved_noise", n_per_class=1, options={"shift_base": "train"})
    assert len(aux) == 10 and aux.source_names == ["train_noise"]


def test_explicit_shift_options_do_not_silently_read_another_folder(split_record, root):
    out = root / "data" / SPLIT
    export_reserved_shift(out, "noise")  # the default std 0.1, shift seed 0
    clear_dataset_cache()
    default = build_aux_set(split_record, "reserved_noise", ratio=None)
    fly = build_aux_set(split_record, "reserved_noise", ratio=None, options={"precomputed": "never"})
    assert torch.equal(default.images, fly.images)
    strong = build_aux_set(split_record, "reserved_noise", ratio=None, options={"noise_std": 0.3})  # not on disk
    assert torch.equal(strong.images, build_aux_set(split_record, "reserved_noise", ratio=None, options={
        "noise_std": 0.3, "precomputed": "never"}).images)
    assert not torch.equal(strong.images, default.images)
    with pytest.raises(AuxDataError, match="exported with other parameters"):
        export_reserved_shift(out, "noise", options={"noise_std": 0.3})


def test_reserved_noise_is_clipped_and_reserved_noise_wrap_is_backdoorbencher_s(tmp_path, caplog):
    """One name, one set: BackdoorBenchER's reserved_noise/ folder (wrapped pixels) is read by reserved_noise_wrap
    only; reserved_noise is always the clipped set, whatever is on disk."""
    from backdoorbench_gic.auxdata.layout import EXPORT_PARAMS_FILE
    from backdoorbench_gic.auxdata.shifts import WRAP_WARNING, shift_warning
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_split_record

    rec = load_attack_record(make_split_record(tmp_path, "r", "cifar10", split_ratio=0.2, train_steps=0, width=8))
    split_dir = rec.dataset().locate()
    folder = export_reserved_shift(split_dir, "noise_wrap")
    assert folder.name == "reserved_noise"  # where BackdoorBenchER's generate_ood.py puts its noise
    os.remove(folder / EXPORT_PARAMS_FILE)  # now it looks made elsewhere, as theirs are
    clear_dataset_cache()
    theirs = build_aux_set(rec, "reserved_noise_wrap", ratio=None)
    wrap_fly = build_aux_set(rec, "reserved_noise_wrap", ratio=None, options={"precomputed": "never"})
    assert torch.equal(theirs.images, wrap_fly.images)
    with caplog.at_level("WARNING"):
        clipped = build_aux_set(rec, "reserved_noise", ratio=None)
    assert "holds wrapped noise" in caplog.text and "reserved_noise_wrap reads it" in caplog.text
    assert torch.equal(clipped.images, build_aux_set(rec, "reserved_noise", ratio=None,
                                                     options={"precomputed": "never"}).images)
    assert not torch.equal(clipped.images, theirs.images)
    # the same noise draws: inside [0, 1] the sets differ by their truncation against our rounding (at most 1
    # level); the wrapped pixels jump across the range
    diff = (clipped.images.int() - theirs.images.int()).abs()
    assert (diff <= 1).float().mean().item() > 0.5 and (diff > 128).any()
    with pytest.raises(AuxDataError, match="name reserved_noise_wrap to read it"):
        build_aux_set(rec, "reserved_noise", ratio=None, options={"precomputed": "always"})
    with pytest.raises(AuxDataError, match="no float form"):
        build_aux_set(rec, "reserved_noise_wrap", ratio=None, options={"quantize": False})
    assert shift_warning("reserved_noise_wrap") == WRAP_WARNING and shift_warning("reserved_noise") is None
    assert shift_warning("mix:reserved+reserved_noise_wrap") == WRAP_WARNING
