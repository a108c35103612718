"""The matrix spec without running anything: the GIC variant axis, ``_base_`` inheritance, roles, and the pins that
keep finished runs valid (cell ids of the shorthand forms; the issue-16 study's cells before and after its specs
were rewritten with variants and inheritance)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from backdoorbench_gic.config import ConfigError
from backdoorbench_gic.matrix import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# cell ids computed at 4c589ad, before the variant axis existed (``parse_spec(FORMS[k]).cells()``, in order)
FORMS = {
    "pair": {"attacks": ["badnet_fm", {"record": "blended_fm", "generate": {"attack": "blended"}}],
             "defenses": ["ft", {"name": "sau", "overrides": {"n_rounds": 3}}], "aux": ["reserved", "reserved_noise"],
             "aux_sizes": [{"ratio": 0.05}, {"n_per_class": 20}], "seeds": [0, 1], "gic": [False, True]},
    "gic_true": {"attacks": ["badnet_fm"], "defenses": ["ft"], "aux": ["reserved"], "gic": True,
                 "gic_overrides": {"placement": "bn-after"}},
    "gic_only": {"attacks": ["badnet_fm"], "defenses": [{"name": "fst", "overrides": {"epochs": 10, "batch_size": 64}}],
                 "aux": ["train", "reserved_tv:RandomPosterize(bits=3,p=1.0)"], "seeds": [2], "gic": [True],
                 "gic_overrides": {"family": "generator"}},
    "default": {"attacks": ["badnet_fm"], "defenses": ["ft"], "aux": ["reserved"]},
}
PAIR_IDS = ["542e0a6fab4b", "030a323f19ba", "148927ee6b39", "7fcefd85a992", "8b360dfe5e61", "41150be164be",
            "4c7c3d115ef3", "b9ff91759274"]  # the first 8 of 64
IDS = {"gic_true": ["cf4aade3c8e6"], "gic_only": ["c27eb0386fc3", "07bef6629f56"], "default": ["71ff93dd9d62"]}


def test_shorthand_cell_ids_and_folders_are_unchanged():
    for form, ids in IDS.items():
        assert [c.cell_id for c in parse_spec(FORMS[form]).cells()] == ids, form
    pair = [c.cell_id for c in parse_spec(FORMS["pair"]).cells()]
    assert pair[:8] == PAIR_IDS and len(pair) == 64
    assert hashlib.sha1("\n".join(pair).encode()).hexdigest()[:16] == "b5832139d58cbb71"  # all 64, in order
    # and the folders the finished cells live in
    assert [str(c.relpath) for c in parse_spec(FORMS["pair"]).cells()[:2]] == [
        "cells/badnet_fm/ft/reserved@r0.05/seed0", "cells/badnet_fm/ft+gic/reserved@r0.05/seed0"]
    cell = parse_spec(FORMS["gic_only"]).cells()[1]
    assert str(cell.relpath) == "cells/badnet_fm/fst-39d63b+gic/reserved_tv_RandomPosterize_bits_3_p_1.0_@default/seed2"


def test_shorthand_is_the_two_variant_axis():
    short = parse_spec({**FORMS["pair"], "gic_overrides": {"delta": 0.1}})
    named = parse_spec({**FORMS["pair"], "gic_overrides": {"delta": 0.1}, "gic": {"off": None, "default": {}}})
    assert short.variants == named.variants == {"off": None, "default": {}}
    assert [(c.cell_id, c.gic_settings) for c in short.cells()] == [(c.cell_id, c.gic_settings) for c in named.cells()]
    assert short.parts() == [short] and short.to_dict()["gic"] == [False, True]


def test_named_variants_are_matrices_of_their_own(tmp_path):
    spec = parse_spec({**FORMS["default"], "name": "m", "output_root": str(tmp_path / "runs" / "m"),
                       "gic_overrides": {"gic_steps": 50},
                       "gic": {"off": None, "default": {}, "bn-after": {"placement": "bn-after"},
                               "gen": {"family": "generator", "gic_steps": 20}}})
    own, after, gen = spec.parts()
    assert (own.name, own.output_root, list(own.variants)) == ("m", tmp_path / "runs" / "m", ["off", "default"])
    assert (after.name, after.output_root) == ("m-bn-after", tmp_path / "runs" / "m-bn-after")
    # a part reads as the shorthand (its spec.yaml), running the variant's settings as its default
    assert after.to_dict()["gic"] == [True] and after.to_dict()["gic_overrides"] == {"gic_steps": 50, "placement": "bn-after"}
    off, default = own.cells()
    (a,), (g,) = after.cells(), gen.cells()
    # the same cell id as the default twin, the variant's settings over gic_overrides, the off cell as its partner
    assert a.cell_id == g.cell_id == default.cell_id != off.cell_id
    assert g.gic_settings == {"gic_steps": 20, "family": "generator"} and g.variant == "gen"
    assert a.uncalibrated().cell_id == off.cell_id and a.uncalibrated().variant == "off"
    assert "ft+gic[bn-after]" in a.describe() and "ft+gic |" in default.describe()
    assert len(spec.cells()) == 4 and spec.part("gen") is not None and spec.part("off").name == "m"
    assert spec.cell_of({"matrix": "m-gen", "cell_id": g.cell_id}).variant == "gen"
    with pytest.raises(KeyError, match="no GIC variant 'nope'"):
        spec.part("nope")


def test_cell_request_is_what_a_worker_runs():
    spec = parse_spec({**FORMS["gic_only"], "aux": ["train"], "name": "m", "defaults": {"device": "cpu", "epochs": 3},
                       "aux_options": {"a": 1}, "aux_options_for": {"train": {"b": 2}}, "eval_limit": 50,
                       "gic": {"off": None, "gen": {"family": "generator"}}})
    off, gen = spec.cells()
    req = off.request(spec, "/tmp/out")
    assert (req.defense, req.result_file, req.output_dir, req.eval_limit, req.n_per_class) == \
        ("fst", "badnet_fm", "/tmp/out", 50, None)
    assert req.overrides == {"device": "cpu", "epochs": 10, "batch_size": 64, "random_seed": 2, "reserved_type": "train"}
    assert req.aux_options == {"a": 1, "b": 2} and req.extra_row["matrix"] == "m" and req.extra_row["gic"] is False
    g = gen.request(spec.part("gen"))
    assert g.defense == "gic" and g.overrides["family"] == "generator" and g.overrides["base"] == "fst"
    assert g.extra_row == {"cell_id": gen.cell_id, "gic": True, "defense_label": "fst", "base_defense": "fst",
                           "aux_size_label": "default", "matrix": "m-gen"}
    # the payload round trip keeps everything the request needs
    from backdoorbench_gic.matrix.jobs import cell_from_payload, cell_payload

    back = cell_from_payload(cell_payload(gen, spec.part("gen").to_dict()))
    assert back == gen and back.request(spec.part("gen")) == g


@pytest.mark.parametrize("gic, match", [
    ({"off": {}}, "write off: null"), ({"bn": None}, "null is only for the uncalibrated"),
    ({"a b": {}}, "must be letters"), ({"x": 3}, "mapping of GIC config keys"), ({}, "mapping of named variants"),
    ([True, True], "same cell twice"), ("yes", "mapping of named variants")])
def test_bad_variants_are_refused(gic, match):
    with pytest.raises(ConfigError, match=match):
        parse_spec({**FORMS["default"], "gic": gic})


def test_yaml_off_key_reads_as_the_uncalibrated_variant():
    data = yaml.safe_load("gic: {off: null, default: {}}")  # PyYAML reads a bare off as false
    assert parse_spec({**FORMS["default"], **data}).variants == {"off": None, "default": {}}


def test_role_is_validated():
    assert parse_spec({**FORMS["default"], "role": "held-out"}).role == "held-out"
    assert parse_spec(FORMS["default"]).role is None
    with pytest.raises(ConfigError, match="role must be one of development, held-out, confirmation"):
        parse_spec({**FORMS["default"], "role": "test"})


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_base_inheritance_merges_like_mmengine(tmp_path):
    write(tmp_path / "a" / "base.yaml", {"name": "b", "output_root": "runs/b", "bb_root": "bb", "attacks": ["x"],
                                         "defenses": ["ft", "fst"], "aux": ["reserved"], "seeds": [0, 1],
                                         "defaults": {"device": "cpu", "epochs": 2},
                                         "gic": {"off": None, "default": {}, "bn-after": {"placement": "bn-after"}}})
    child = write(tmp_path / "b" / "child.yaml", {"_base_": "../a/base.yaml", "name": "c", "seeds": [3],
                                                  "defaults": {"epochs": 5}, "role": "held-out",
                                                  "gic": {"gen": {"family": "generator"}}})
    spec = load_spec(child)
    assert spec.name == "c" and spec.seeds == [3] and spec.role == "held-out"
    assert spec.defaults == {"device": "cpu", "epochs": 5}  # mappings merge key by key
    assert list(spec.variants) == ["off", "default", "bn-after", "gen"]
    assert spec.output_root == tmp_path / "a" / "runs" / "b"  # a path stays relative to the file that wrote it
    assert spec.bb_root == tmp_path / "a" / "bb" and spec.bases == [tmp_path / "a" / "base.yaml"]
    # _delete_ replaces the base's mapping; lists are always replaced
    only = write(tmp_path / "b" / "only.yaml", {"_base_": "child.yaml", "output_root": "mine", "defenses": ["sau"],
                                                "gic": {"_delete_": True, "bn-reset": {"placement": "bn-reset"}}})
    spec = load_spec(only)
    assert list(spec.variants) == ["bn-reset"] and [d.name for d in spec.defenses] == ["sau"]
    assert spec.output_root == tmp_path / "b" / "mine" and spec.bases[0] == tmp_path / "b" / "child.yaml"
    assert len(spec.bases) == 2


def test_base_cycles_and_bad_bases_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml", "attacks": ["x"], "defenses": ["ft"], "aux": ["reserved"]})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match=r"_base_ inheritance loops \(a.yaml -> b.yaml -> a.yaml\)"):
        load_spec(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"_base_": "self.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_spec(tmp_path / "self.yaml")
    write(tmp_path / "gone.yaml", {"_base_": "nothere.yaml"})
    with pytest.raises(FileNotFoundError, match="named by _base_ in"):
        load_spec(tmp_path / "gone.yaml")
    write(tmp_path / "num.yaml", {"_base_": 3})
    with pytest.raises(ConfigError, match="_base_ must name a spec file"):
        load_spec(tmp_path / "num.yaml")
    with pytest.raises(ConfigError, match="_base_ names a spec file"):
        parse_spec({**FORMS["default"], "_base_": "x.yaml"})


# Issue 16's study: 48 spec files at 4c589ad (one per block and per variant), 14 now (variants as an axis, blocks
# inheriting with _base_). Per matrix (an old file's name = a part's name now): the role (the old file-name prefix
# read as dev -> development, heldout and fresh -> held-out, preact -> confirmation), the number of cells and a digest
# of every cell's folder, id, relative path and full request (record, defense, overrides with seed, aux type, size
# and GIC settings, aux options, test subset, row keys), computed from the old files with 4c589ad's code.
STUDY_AT_4C589AD = {
    "gic16-dev": ("development", 128, "4c209fe92ced8f65"),
    "gic16-dev-anp": ("development", 32, "673c5415c8dc364f"),
    "gic16-dev-anp-before+generator": ("development", 16, "5574325e1818b07e"),
    "gic16-dev-before+feature": ("development", 16, "20882ffd3b65c48b"),
    "gic16-dev-before+generator": ("development", 64, "511ce495fbd8c65c"),
    "gic16-dev-before+guard": ("development", 16, "5ecb40113a6ded3f"),
    "gic16-dev-bn-after": ("development", 64, "4cd4944eed8505ea"),
    "gic16-dev-bn-refresh": ("development", 64, "edc6de431931f4f4"),
    "gic16-dev-bn-reset": ("development", 64, "26ef1271079b504c"),
    "gic16-dev-bn-transfer": ("development", 64, "d1a5ab634d8e8d33"),
    "gic16-dev-both": ("development", 64, "141dca4e8641a6e0"),
    "gic16-dev-nad": ("development", 64, "01cacfb9b5a0333e"),
    "gic16-dev-nad-before+generator": ("development", 32, "0bfcc784511c1d79"),
    "gic16-dev-sau": ("development", 64, "2e4eef5ab74452f6"),
    "gic16-dev-sau-before+generator": ("development", 32, "8289cbc0b183c087"),
    "gic16-dev-sau-bn-after": ("development", 16, "1d9acd95c1140b0b"),
    "gic16-dev-sau-bn-refresh": ("development", 16, "9eefb2f11b7f27b3"),
    "gic16-dev-sau-bn-reset": ("development", 16, "68b65bb99f9f87db"),
    "gic16-dev-sau-bn-transfer": ("development", 16, "37b15d51ef78f062"),
    "gic16-dev-sau-bn-transfer-first1": ("development", 16, "ed158441f50ee40d"),
    "gic16-dev-sau-bn-transfer-first2": ("development", 16, "11906b565a0216c4"),
    "gic16-dev-sau-both": ("development", 16, "543b9945c6b4a85e"),
    "gic16-dev-wanet-sig": ("development", 64, "4f0e5fd7326b7e3a"),
    "gic16-dev-wanet-sig-before+generator": ("development", 32, "758926d31627a6e1"),
    "gic16-dev-wanet-sig-bn-after": ("development", 32, "d9ef56fb8b861c85"),
    "gic16-dev-wanet-sig-bn-transfer": ("development", 32, "1be1dd361e8f3530"),
    "gic16-fresh-sau": ("held-out", 48, "9cf1068b288b9cae"),
    "gic16-fresh-wanet-sig-sau": ("held-out", 16, "0db9dbf6e644e64d"),
    "gic16-heldout": ("held-out", 64, "ea3ffc10a382d539"),
    "gic16-heldout-before+generator": ("held-out", 32, "0536661e6d700a2c"),
    "gic16-heldout-bn-after": ("held-out", 32, "3619a903dd5ded1f"),
    "gic16-heldout-bn-refresh": ("held-out", 32, "3cb1b24684f20438"),
    "gic16-heldout-bn-reset": ("held-out", 32, "f40a035a3544bb0b"),
    "gic16-heldout-bn-transfer": ("held-out", 32, "193d8da707a347ab"),
    "gic16-heldout-both": ("held-out", 32, "3bde4e5b2bfade1c"),
    "gic16-heldout-sau": ("held-out", 16, "613b6f2d62fe7205"),
    "gic16-heldout-sau-before+generator": ("held-out", 8, "04eed6ad05dc3dfb"),
    "gic16-heldout-sau-bn-after": ("held-out", 8, "1f6ff3a20d55a5fd"),
    "gic16-heldout-sau-bn-refresh": ("held-out", 8, "bd1bfec2f156dbed"),
    "gic16-heldout-sau-bn-reset": ("held-out", 8, "8ba93e2ac08f4a71"),
    "gic16-heldout-sau-bn-transfer": ("held-out", 8, "d379656f54946d14"),
    "gic16-heldout-sau-both": ("held-out", 8, "afdcc1d516666ccd"),
    "gic16-heldout-wanet-sig": ("held-out", 32, "0525d0554849cf48"),
    "gic16-heldout-wanet-sig-before+generator": ("held-out", 16, "9550badd06ef571e"),
    "gic16-heldout-wanet-sig-bn-after": ("held-out", 16, "91405a7153920cb7"),
    "gic16-heldout-wanet-sig-bn-transfer": ("held-out", 16, "bf3b2d93a5d83cad"),
    "gic16-preact-ft": ("confirmation", 24, "de48a16becd66d04"),
    "gic16-preact-sau": ("confirmation", 12, "edc65a4976fdc60e"),
}
REQUEST_FIELDS = ("result_file", "defense", "bb_root", "overrides", "n_per_class", "aux_options", "monitor_every",
                  "eval_limit", "trust_checkpoint", "extra_row")


def study_cells() -> dict[str, tuple[str, list[str]]]:
    """Per matrix of benchmarks/gic16/: its role and each cell canonicalised as the pins were."""
    out: dict[str, tuple[str, list[str]]] = {}
    for path in sorted((ROOT / "benchmarks" / "gic16").glob("*.yaml")):
        spec = load_spec(path)
        for part in spec.parts():
            rows = out.setdefault(part.name, (spec.role, []))[1]
            assert out[part.name][0] == spec.role, f"{part.name}: two roles"
            for cell in part.cells():
                req = cell.request(part)
                fields = {k: getattr(req, k) for k in REQUEST_FIELDS}
                fields["bb_root"] = os.path.relpath(fields["bb_root"], ROOT)
                rows.append(json.dumps([part.output_root.name, cell.cell_id, str(cell.relpath), fields], sort_keys=True))
    return out


def test_study_specs_expand_to_the_cells_they_replaced():
    got = study_cells()
    assert sorted(got) == sorted(STUDY_AT_4C589AD)
    differ = {name: (role, len(rows), hashlib.sha1("\n".join(sorted(rows)).encode()).hexdigest()[:16])
              for name, (role, rows) in got.items()}
    assert {k: v for k, v in differ.items() if v != STUDY_AT_4C589AD[k]} == {}
    assert sum(n for _, n, _ in STUDY_AT_4C589AD.values()) == 1556
    assert len(list((ROOT / "benchmarks" / "gic16").glob("*.yaml"))) == 14
