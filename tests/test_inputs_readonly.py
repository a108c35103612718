"""Inputs stay read-only and requests fail before any model is built: a defense run leaves the attack record's
folder byte-identical (caches live in the cache directory), an auxiliary-set request that cannot work is refused
by a check that needs no model, and the one KEY=VALUE parser types its values."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from backdoorbench_gic.auxdata import AuxDataError, check_aux_request, known_types, parse_reserved_type
from backdoorbench_gic.config import ConfigError, parse_key_value, parse_key_values
from backdoorbench_gic.pipeline import DefenseRequest, run_defense
from backdoorbench_gic.records import AttackRecord, load_attack_record
from backdoorbench_gic.registry import UnknownNameError
from backdoorbench_gic.testing import make_bb_record


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("readonly")
    make_bb_record(r, "victim", n_train=60, n_test=30, train_steps=0, model_name="smallcnn", width=4)
    return r


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_defense_run_leaves_the_record_folder_unchanged(root, tmp_path):
    before = snapshot(root / "record" / "victim")
    req = dict(result_file="victim", defense="ft", bb_root=str(root), device="cpu", monitor_every=0, progress=False,
               overrides={"reserved_type": "train", "ratio": 0.5, "epochs": 1, "batch_size": 10})
    a = run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "a")))
    assert snapshot(root / "record" / "victim") == before
    b = run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "b")))  # the victim's numbers from the cache
    assert (a["acc_before"], a["asr_before"], a["ra_before"]) == (b["acc_before"], b["asr_before"], b["ra_before"])
    assert snapshot(root / "record" / "victim") == before


@pytest.mark.parametrize("overrides, aux_options, n_per_class, match", [
    ({"reserved_type": "reserved_foo"}, {}, None, "unknown auxiliary type 'reserved_foo'"),
    ({"reserved_type": "nosuch"}, {}, None, "unknown auxiliary type 'nosuch'"),
    ({"reserved_type": "mix:train+reserved_foo"}, {}, None, "reserved_foo"),
    ({"reserved_type": "train"}, {"noise_stdd": 0.1}, None, "noise_stdd"),
    ({"reserved_type": "train"}, {}, 0, "n_per_class"),
    ({"reserved_type": "train_vp"}, {}, None, "train_vp"),
    ({"reserved_type": "train", "index": "/nonexistent/index.txt"}, {}, None, "index file"),
])
def test_bad_requests_are_refused_before_the_model_is_built(root, tmp_path, monkeypatch, overrides, aux_options,
                                                            n_per_class, match):
    def no_model(self, *a, **k):
        raise AssertionError("the victim was built before the request was checked")

    monkeypatch.setattr(AttackRecord, "build_model", no_model)
    with pytest.raises((AuxDataError, UnknownNameError, ValueError), match=match):
        run_defense(DefenseRequest(result_file="victim", defense="ft", bb_root=str(root), device="cpu",
                                   output_dir=str(tmp_path / "o"), overrides=overrides, aux_options=aux_options,
                                   n_per_class=n_per_class, progress=False))
    assert not (tmp_path / "o").exists()  # nothing written either


def test_check_aux_request_accepts_what_builds(root):
    record = load_attack_record("victim", root)
    check_aux_request(record, "train", options={"include_poisoned_indices": False}, n_per_class=2)
    check_aux_request(record, "mix:train+external:digits", options={"allow_label_mismatch": True})
    # the digits' labels are not a CIFAR-10 victim's: refused before any model is built, inside a mix too
    with pytest.raises(AuxDataError, match="the two label sets differ"):
        check_aux_request(record, "mix:train+external:digits")


def test_source_forms_are_declared_not_special_cased():
    assert parse_reserved_type("reserved_vp") == ("vp", "reserved")
    assert parse_reserved_type("mix:train+reserved") == ("mix", "train+reserved")
    shown = known_types()
    assert "<type>_vp" in shown and "mix:<a>+<b>[@w]+..." in shown and "external:<arg>" in shown


def test_key_value_parser_types_values():
    assert parse_key_values(["a=1e-3", "b=true", "c=train", "d=[1, 2]", "e={x: 1}", "a=2"]) == \
        {"a": 2, "b": True, "c": "train", "d": [1, 2], "e": {"x": 1}}
    assert parse_key_value("noise_wrap=yes") == ("noise_wrap", True)
    assert parse_key_value("shift=reserved_noise=2") == ("shift", "reserved_noise=2")
    for bad in ("novalue", "=3"):
        with pytest.raises(ConfigError, match="--aux_option needs KEY=VALUE"):
            parse_key_value(bad, "--aux_option")


def test_inversion_bn_term_by_hand():
    """The inversion's R_BN comes from the one BN-statistics collector: checked against a hand computation."""
    from backdoorbench_gic.auxdata.inversion import _bn_term
    from backdoorbench_gic.bnstats import BNBatchStats

    bn = torch.nn.BatchNorm2d(1)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    bn.eval()
    x = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(4, 1, 1, 1)  # mean 2, unbiased variance 14/3
    stats = BNBatchStats(bn)
    bn(x)
    m, v, mu, s2 = 2.0, 14.0 / 3.0, 1.0, 4.0
    v_e, s2_e = v + bn.eps, s2 + bn.eps
    kl = 0.25 * (v_e / s2_e + s2_e / v_e - 2 + (m - mu) ** 2 * (1 / v_e + 1 / s2_e))
    assert float(_bn_term(stats, "kl")) == pytest.approx(kl, rel=1e-5)
    assert float(_bn_term(stats, "l2")) == pytest.approx(abs(m - mu) + abs(v - s2), rel=1e-5)
    assert float(_bn_term(None, "kl")) == 0.0
    stats.remove()
    assert not math.isnan(kl)


def test_matrix_validation_checks_each_aux_type_against_the_records(root, tmp_path):
    """A spec naming a folder type its records lack is refused by validation, before any cell runs."""
    import yaml

    from backdoorbench_gic.matrix import load_spec, validate_spec

    spec = {"name": "t", "output_root": str(tmp_path / "out"), "bb_root": str(root), "attacks": ["victim"],
            "defenses": [{"name": "ft", "overrides": {"epochs": 1}}], "aux": ["train", "reserved_foo"],
            "seeds": [0], "defaults": {"device": "cpu"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    problems = validate_spec(load_spec(tmp_path / "s.yaml"))
    assert [p for p in problems if "reserved_foo" in p and "victim" in p], problems
    assert not [p for p in problems if "'train'" in p], problems


def test_a_bad_type_given_on_the_command_line_is_refused_before_the_defenses_load(root, tmp_path, monkeypatch):
    from backdoorbench_gic.registry import DEFENSES

    def no_registry(*a, **k):
        raise AssertionError("the defense registry was loaded before the auxiliary type was checked")

    monkeypatch.setattr(DEFENSES, "get", no_registry)
    with pytest.raises(AuxDataError, match="reserved_foo"):
        run_defense(DefenseRequest(result_file="victim", defense="ft", bb_root=str(root),
                                   overrides={"reserved_type": "reserved_foo"}, progress=False))
