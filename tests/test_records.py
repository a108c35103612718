import argparse
import io
import os
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from backdoorbench_gic.checkpoint import (StateDictMismatchError, UntrustedCheckpointError, load_state_dict_strict,
                                          normalize_state_dict, safe_torch_load)
from backdoorbench_gic.data.datasets import open_dataset
from backdoorbench_gic.models import build_model
from backdoorbench_gic.inspection import inspect_record
from backdoorbench_gic.records import RECORD_KEYS, RecordError, load_attack_record
from backdoorbench_gic.testing import make_bb_record


def test_record_has_backdoorbench_keys_and_types(bb_record):
    root, record_dir = bb_record
    raw = torch.load(record_dir / "attack_result.pt", weights_only=False)
    assert list(raw.keys()) == list(RECORD_KEYS)
    assert raw["img_size"] == (32, 32, 3) and all(type(v) is int for v in raw["img_size"])
    assert raw["data_path"] == "./data/cifar10" and raw["clean_data"] == "cifar10"
    bd = raw["bd_train"]
    assert bd["original_index_array"].dtype == np.int64 and bd["poison_indicator"].dtype == np.float64
    assert len(bd["poison_indicator"]) == 100 and bd["getitem_all"] is True and bd["getitem_all_switch"] is False
    dd = bd["bd_data_container"]["data_dict"]
    assert all(type(k) is np.int64 for k in dd)
    assert set(int(k) for k in dd) == set(np.flatnonzero(bd["poison_indicator"] == 1).tolist())
    k = next(iter(dd))
    entry = dd[k]
    assert entry["path"] == f"./record/badnet_fixture/bd_train_dataset/{entry['other_info'][1]}/{int(k)}.png"
    assert (root / entry["path"]).is_file()
    # bd_test: all non-target test samples (all-to-one, target 0)
    test_labels = open_dataset("cifar10", directory=root / "data" / "cifar10").test.labels.numpy()
    assert raw["bd_test"]["original_index_array"].tolist() == np.flatnonzero(test_labels != 0).tolist()
    assert len(raw["bd_test"]["poison_indicator"]) == 50


def test_write_read_round_trip(bb_record):
    root, record_dir = bb_record
    raw = torch.load(record_dir / "attack_result.pt", weights_only=False)
    rec = load_attack_record("badnet_fixture", root)
    assert rec.targets == [0] and rec.label_mode == "all2one"
    bd_train = rec.bd_train
    flags = bd_train.poison.numpy()
    assert flags.tolist() == raw["bd_train"]["poison_indicator"].astype(int).tolist()
    dd = raw["bd_train"]["bd_data_container"]["data_dict"]
    for k, v in dd.items():
        assert int(bd_train.labels[int(k)]) == v["other_info"][0]
        assert int(bd_train.original_labels[int(k)]) == v["other_info"][1]
    clean = rec.clean_train
    poisoned = np.flatnonzero(flags)
    clean_idx = np.flatnonzero(flags == 0)
    # clean positions are untouched, poisoned ones differ only in the 3x3 corner and read back from PNG exactly
    assert torch.equal(bd_train.images[clean_idx], clean.images[clean_idx])
    diff = (bd_train.images[poisoned].int() - clean.images[poisoned].int()).abs()
    assert diff[:, :, :-3, :].sum() == 0 and diff[:, :, :, :-3].sum() == 0
    assert (bd_train.images[poisoned][:, :, -3:, -3:] == 255).all()
    x, label, index, flag, orig = bd_train[int(poisoned[0])]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and flag == 1 and label == 0
    bd_test = rec.bd_test
    assert len(bd_test) == len(raw["bd_test"]["original_index_array"]) and int(bd_test.poison.sum()) == len(bd_test)
    assert bd_test.indices.tolist() == raw["bd_test"]["original_index_array"].tolist()


def test_model_loads_strictly_and_matches_weights(bb_record):
    root, record_dir = bb_record
    rec = load_attack_record(record_dir)
    model = rec.build_model()
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, rec.state_dict[k])
    assert model.net.conv1.weight.shape[0] == 8  # width inferred from the state dict


def test_module_prefix_is_stripped(tmp_path):
    record_dir = make_bb_record(tmp_path, "dp", n_train=40, n_test=20, module_prefix=True)
    raw = torch.load(record_dir / "attack_result.pt", weights_only=False)
    assert all(k.startswith("module.") for k in raw["model"])
    model = load_attack_record(record_dir).build_model()
    assert "conv1.weight" in model.net.state_dict()


def test_fp_style_pruning_pairs_are_folded():
    net = build_model("preactresnet18", 10, width=8)
    state = dict(net.state_dict())
    w = state.pop("linear.weight")
    mask = torch.ones_like(w)
    mask[:, :3] = 0
    state["linear.weight_orig"] = w
    state["linear.weight_mask"] = mask
    fresh = build_model("preactresnet18", 10, width=8)
    load_state_dict_strict(fresh, state)
    assert torch.equal(fresh.linear.weight, w * mask)
    assert (fresh.linear.weight[:, :3] == 0).all()


def test_missing_and_unexpected_keys_are_named():
    net = build_model("preactresnet18", 10, width=8)
    state = dict(net.state_dict())
    state.pop("layer3.1.bn2.running_var")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as exc:
        load_state_dict_strict(build_model("preactresnet18", 10, width=8), state)
    assert "layer3.1.bn2.running_var" in str(exc.value) and "extra.weight" in str(exc.value)


def test_normalize_state_dict_keeps_order():
    sd = {"module.a": torch.zeros(1), "module.b": torch.ones(1)}
    assert list(normalize_state_dict(sd)) == ["a", "b"]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_crafted_pickle_runs_nothing_and_is_refused(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "record" / "evil"
    evil.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "model": _Evil(target)}, evil / "attack_result.pt")
    with pytest.raises(UntrustedCheckpointError) as exc:
        load_attack_record(evil)
    assert not target.exists()
    msg = str(exc.value)
    assert "system" in msg and "--trust_checkpoint" in msg
    report = inspect_record(evil)
    assert not report.valid and not target.exists()


def test_trust_flag_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "plain.pt"
    # BackdoorBench's info.pickle holds an argparse.Namespace: outside the allow-list
    torch.save({"x": torch.ones(1), "args": argparse.Namespace(lr=0.01)}, path)
    with pytest.raises(UntrustedCheckpointError, match="argparse.Namespace"):
        safe_torch_load(path)
    assert safe_torch_load(path, trust=True)["args"].lr == 0.01
    assert "trust_checkpoint" in caplog.text


def test_numpy1_spelling_is_accepted(bb_record, tmp_path):
    """Records written under numpy 1.x name numpy.core.multiarray.* instead of numpy._core.multiarray.*."""
    _, record_dir = bb_record
    src = zipfile.ZipFile(record_dir / "attack_result.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            out.writestr(info, data)
    path = tmp_path / "np1.pt"
    path.write_bytes(buf.getvalue())
    loaded = safe_torch_load(path)
    assert loaded["bd_train"]["poison_indicator"].dtype == np.float64


def test_inspect_valid_record_and_evaluate_agrees(bb_record):
    root, record_dir = bb_record
    report = inspect_record("badnet_fixture", root, evaluate=True)
    assert report.valid, report.render()
    assert report.facts["attack target(s)"].startswith("[0]")
    assert report.facts["bd_train poisoned"].startswith("10 of 100")
    assert "evaluated" in report.facts


def test_inspect_flags_tampered_summary(fresh_bb_record):
    root, record_dir = fresh_bb_record
    summary = pd.read_csv(record_dir / "attack_df_summary.csv", index_col=0)
    summary.loc["last", "test_asr"] = 0.987
    summary.to_csv(record_dir / "attack_df_summary.csv")
    report = inspect_record(record_dir, evaluate=True)
    assert not report.valid
    assert any("disagree" in p and "test_asr" in p for p in report.problems)


def test_inspect_rejects_missing_pngs_with_reason(fresh_bb_record):
    root, record_dir = fresh_bb_record
    shutil.rmtree(record_dir / "bd_test_dataset" / "1")
    report = inspect_record(record_dir)
    assert not report.valid
    assert any("bd_test" in p and "missing PNGs" in p for p in report.problems)
    with pytest.raises(RecordError, match="poisoned PNGs are missing"):
        _ = load_attack_record(record_dir).bd_test


def test_renamed_record_folder_still_finds_pngs(fresh_bb_record, caplog):
    root, record_dir = fresh_bb_record
    moved = record_dir.parent / "renamed"
    record_dir.rename(moved)
    rec = load_attack_record(moved)
    assert len(rec.bd_test) > 0
    assert "renamed" in caplog.text


def test_rejects_defense_result_and_missing_keys(tmp_path):
    d = tmp_path / "record" / "x"
    d.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": {}}, d / "attack_result.pt")
    with pytest.raises(RecordError, match="defense_result.pt"):
        load_attack_record(d)


def test_missing_record_error_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="--bb_root"):
        load_attack_record("nope", tmp_path)


def test_poison_indicator_and_data_dict_must_agree(fresh_bb_record):
    root, record_dir = fresh_bb_record
    raw = torch.load(record_dir / "attack_result.pt", weights_only=False)
    raw["bd_train"]["poison_indicator"][:] = 0
    torch.save(raw, record_dir / "attack_result.pt")
    with pytest.raises(RecordError, match="disagree"):
        load_attack_record(record_dir)
