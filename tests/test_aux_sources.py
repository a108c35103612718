"""External, synthetic, mixed and calibrated sources; BackdoorBenchER's on-disk layouts; inversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoorbench_gic.auxdata import (AuxDataError, build_aux_set, check_aux_request, export_image_folder, import_image_folder,
                                   read_vp_arrays, vp_dir, write_vp_arrays)
from backdoorbench_gic.testing import class_images, write_image_folder



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    root = tmp_path_factory.mktemp("sources")
    return load_attack_record(make_bb_record(root, "badnet_mnist", "mnist", n_train=100, n_test=20,
                                             model_name="smallcnn", width=8, train_steps=0))


def test_external_digits_geometry(mnist):
    aux = build_aux_set(mnist, "external:digits", n_per_class=5)
    assert aux.images.shape == (50, 1, 28, 28) and aux.is_uint8
    assert aux.class_counts(10).tolist() == [5] * 10 and aux.source_names == ["external:digits"]
    # 8x8 -> 20x20 in the middle of 28x28: a 4-pixel black border
    assert aux.images[:, :, :4].max() == 0 and aux.images[:, :, -4:].max() == 0
    assert aux.images[:, :, :, :4].max() == 0 and aux.images[:, :, :, -4:].max() == 0
    assert aux.images[:, :, 4:24, 4:24].float().mean() > 20
    assert len(build_aux_set(mnist, "external:digits", ratio=None)) == 1797  # the whole pool
    # the sampling rule: ratio_c = 0.5 x |train| 100 / |pool| 1797 = 0.027824; the digits classes hold
    # [178, 182, 177, 183, 181, 182, 181, 179, 174, 180] images -> floor(ratio_c x count)
    by_rule = build_aux_set(mnist, "external:digits", ratio=0.5)
    assert by_rule.class_counts(10).tolist() == [4, 5, 4, 5, 5, 5, 5, 4, 4, 5]


def test_external_digits_refused_for_other_victims(tmp_path):
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    rec = load_attack_record(make_bb_record(tmp_path, "c", "cifar10", n_train=20, n_test=20, model_name="smallcnn",
                                            width=8))
    for name in ("digits", "fonts"):
        # refused by the early check and by the build, naming both label sets
        for attempt in (lambda: check_aux_request(rec, f"external:{name}", n_per_class=1),
                        lambda: build_aux_set(rec, f"external:{name}", n_per_class=1)):
            with pytest.raises(AuxDataError, match=r"labels of the digits 0-9.*the 10 classes of cifar10"):
                attempt()
        aux = build_aux_set(rec, f"external:{name}", n_per_class=1, options={"allow_label_mismatch": True})
        assert aux.images.shape == (10, 3, 32, 32) and aux.source_names == [f"external:{name}"]


def test_folder_sources_with_label_maps(mnist, tmp_path):
    x, y = class_images(12, 3, 28, 28, 1, seed=1)
    for name, lab in (("cat", 0), ("dog", 1), ("eel", 2)):
        sel = y == lab
        write_image_folder(tmp_path / "ext" / name / "x", x[sel], np.zeros(sel.sum()))  # nested: read recursively
    aux = build_aux_set(mnist, f"external:{tmp_path / 'ext'}", ratio=None, options={"label_map": {"cat": 7, "dog": 3}})
    assert sorted(aux.labels.tolist()) == [3] * 4 + [7] * 4  # eel dropped
    write_image_folder(tmp_path / "syn", x, y)
    syn = build_aux_set(mnist, f"synthetic:{tmp_path / 'syn'}", ratio=None)
    assert syn.source_names == [f"synthetic:{tmp_path / 'syn'}"]
    order = np.lexsort((np.arange(12), y))  # ImageFolder order: class folders, then file names
    assert torch.equal(syn.images, torch.from_numpy(x[order]).permute(0, 3, 1, 2))
    assert syn.labels.tolist() == y[order].tolist()
    with pytest.raises(AuxDataError, match="no folder 'nowhere'"):
        build_aux_set(mnist, "synthetic:nowhere", ratio=None)


def test_mix_keeps_provenance(mnist):
    aux = build_aux_set(mnist, "mix:train+external:digits", n_per_class=4, seed=0)
    assert aux.source_names == ["train", "external:digits"] and aux.name == "mix:train+external:digits"
    assert len(aux.positions_of_source("train")) == 20 and len(aux.positions_of_source("external:digits")) == 20
    assert aux.class_counts(10).tolist() == [4] * 10  # n_per_class counts the whole set: 2 + 2
    train_part = aux.positions_of_source("train")
    assert torch.equal(aux.images[train_part], mnist.clean_train.images[aux.indices[train_part]])
    weighted = build_aux_set(mnist, "mix:train@3+external:digits", n_per_class=4)
    assert len(weighted.positions_of_source("train")) == 30
    assert len(weighted.positions_of_source("external:digits")) == 10
    # ratio 0.4 split evenly: train at 0.2 gives floor(0.2 x 10) = 2 per class; digits at
    # ratio_c = 0.2 x 100 / 1797 = 0.01113 gives floor(0.01113 x [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    # = [1, 2, 1, 2, 2, 2, 2, 1, 1, 2]
    by_ratio = build_aux_set(mnist, "mix:train+external:digits", ratio=0.4)
    assert by_ratio.class_counts(10).tolist() == [3, 4, 3, 4, 4, 4, 4, 3, 3, 4]
    with pytest.raises(AuxDataError, match="unknown option"):
        build_aux_set(mnist, "mix:train+external:digits", n_per_class=2, options={"noise_std": 1})
    with pytest.raises(AuxDataError, match="index files cannot"):
        build_aux_set(mnist, "mix:train+external:digits", index_file="x")


def test_vp_arrays_exact(mnist, tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand((20, 1, 28, 28), generator=g)
    labels = torch.arange(20) % 10
    folder = vp_dir(mnist.dataset_dir(), "reserved_noise", mnist.name)
    assert folder.parts[-2:] == ("reserved_noise_vp", "badnet_mnist")
    write_vp_arrays(folder, imgs, labels, num_classes=10)
    arr, lab = read_vp_arrays(folder)
    assert arr.dtype == np.float32 and arr.shape == (20, 28, 28, 1) and lab.dtype == np.int64 and lab.shape == (20,)
    assert np.array_equal(arr, imgs.permute(0, 2, 3, 1).numpy()) and lab.tolist() == labels.tolist()
    aux = build_aux_set(mnist, "reserved_noise_vp", ratio=None)
    assert aux.images.dtype == torch.float32 and torch.equal(aux.images, imgs)
    assert aux.source_names == ["reserved_noise_vp"]
    assert build_aux_set(mnist, "reserved_noise_vp", n_per_class=1).class_counts(10).tolist() == [1] * 10
    # what a hand-made file can get wrong
    bad = tmp_path / "bad"
    cases = [
        (np.zeros((2, 28, 28, 1), np.float64), np.zeros(2, np.int64), "must be float32"),
        (np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64), "channels first"),
        (np.full((2, 28, 28, 1), 2.0, np.float32), np.zeros(2, np.int64), r"must lie in \[0,1\]"),
        (np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int32), "labels must be int64"),
        (np.zeros((2, 28, 28, 1), np.float32), np.zeros(3, np.int64), r"shape \(2,\)"),
    ]
    for im, lb, msg in cases:
        np.save(bad / "images.npy" if bad.mkdir(exist_ok=True) is None else None, im)
        np.save(bad / "labels.npy", lb)
        with pytest.raises(AuxDataError, match=msg):
            read_vp_arrays(bad)
    np.save(bad / "images.npy", np.zeros((2, 32, 32, 1), np.float32))
    np.save(bad / "labels.npy", np.zeros(2, np.int64))
    with pytest.raises(AuxDataError, match=r"victim takes \(28, 28, 1\)"):
        read_vp_arrays(bad, expected_hwc=(28, 28, 1))
    with pytest.raises(AuxDataError, match="uint8"):
        write_vp_arrays(bad, np.zeros((2, 28, 28, 1), np.uint8), [0, 1])
    with pytest.raises(FileNotFoundError, match="written by GIC"):
        build_aux_set(mnist, "train_vp", ratio=None)


def test_er_layout_round_trip_is_lossless(mnist, tmp_path):
    aux = build_aux_set(mnist, "mix:train+external:digits", n_per_class=2, seed=1)
    out = export_image_folder(aux, tmp_path / "data" / "mnist" / "mixed", meta={"seed": 1})
    assert (out / "meta.txt").is_file() and (out / "samples.csv").is_file()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 20 and f"{int(aux.labels[0]):05d}/00000.png" in files  # <label>/<position in the set>
    back = import_image_folder(out, mnist.spec, order="file")
    assert torch.equal(back.images, aux.images) and torch.equal(back.labels, aux.labels)
    assert torch.equal(back.indices, aux.indices) and torch.equal(back.sources, aux.sources)
    assert back.source_names == aux.source_names
    er_order = import_image_folder(out, mnist.spec)  # what BackdoorBenchER's ImageFolder sees
    assert er_order.labels.tolist() == sorted(aux.labels.tolist())
    with pytest.raises(AuxDataError, match="already holds"):
        export_image_folder(aux, out)
    # the folder is usable as a source by name, like BackdoorBenchER's own sets
    via_folder = build_aux_set(mnist, f"folder:{out}", ratio=None)
    assert sorted(via_folder.labels.tolist()) == sorted(aux.labels.tolist())


def test_float_sets_are_quantised_with_a_warning_or_refused(mnist, tmp_path, caplog):
    x = torch.full((2, 1, 28, 28), 0.5)
    from backdoorbench_gic.data.imageset import ImageSet

    fset = ImageSet(x, [0, 1], name="f")
    with pytest.raises(AuxDataError, match="float images"):
        export_image_folder(fset, tmp_path / "f1", float_policy="error")
    export_image_folder(fset, tmp_path / "f2")
    assert "quantising float images" in caplog.text
    back = import_image_folder(tmp_path / "f2", mnist.spec, order="file")
    assert back.images.unique().tolist() == [128]  # round(0.5 * 255)


def test_inversion_is_seeded_and_in_range(mnist):
    opts = {"inversion_steps": 4, "inversion_batch_size": 20, "inversion_cache": False}
    a = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options=opts)
    b = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options=opts)
    c = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=1, options=opts)
    assert a.images.dtype == torch.float32 and a.images.shape == (20, 1, 28, 28)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.class_counts(10).tolist() == [2] * 10 and a.source_names == ["synthetic:inversion"]
    with pytest.raises(AuxDataError, match="steps must be >= 1"):
        build_aux_set(mnist, "synthetic:inversion", n_per_class=1, options={"inversion_steps": 0})


def test_inversion_cache_reuses_identical_requests_only(mnist, tmp_path, monkeypatch):
    """A matrix asks for the same inversion once per defense: the second request is read back, not recomputed;
    another seed or setting is a new entry, and a damaged entry is recomputed rather than trusted."""
    from backdoorbench_gic.auxdata import inversion

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = inversion.invert_victim
    monkeypatch.setattr(inversion, "invert_victim", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    opts = {"inversion_steps": 3, "inversion_batch_size": 20}
    a = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options=opts)
    b = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options=opts)
    assert calls == [0] and torch.equal(a.images, b.images) and a.labels.tolist() == b.labels.tolist()
    build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=1, options=opts)
    build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options={**opts, "inversion_steps": 4})
    assert calls == [0, 1, 0]
    entries = sorted((tmp_path / "cache" / "inversion").glob("*.pt"))
    assert len(entries) == 3
    for e in entries:
        e.write_bytes(b"not a checkpoint")
    c = build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options=opts)
    assert calls == [0, 1, 0, 0] and torch.equal(c.images, a.images)
    build_aux_set(mnist, "synthetic:inversion", n_per_class=2, seed=0, options={**opts, "inversion_cache": False})
    assert calls == [0, 1, 0, 0, 0]


def test_inversion_moves_toward_the_running_statistics(mnist):
    """25 steps already pull the BN statistics toward the running ones and the predictions toward the labels."""
    from backdoorbench_gic.auxdata.inversion import InversionConfig, invert_victim
    from backdoorbench_gic.auxdata.quality import measure_quality, recalibrate_bn
    from backdoorbench_gic.data.imageset import ImageSet

    victim = recalibrate_bn(mnist.build_model(), mnist.clean_train)  # running stats = the training data's
    x0, y, _ = invert_victim(victim, 10, 2, (1, 28, 28), seed=0, config=InversionConfig(steps=1, lr=1e-6))
    x, y, stats = invert_victim(victim, 10, 2, (1, 28, 28), seed=0, config=InversionConfig(steps=25))
    before = measure_quality(victim, ImageSet(x0, y), 10)
    after = measure_quality(victim, ImageSet(x, y), 10)
    assert after.bn_div < 0.6 * before.bn_div
    assert after.accuracy > before.accuracy
