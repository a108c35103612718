"""What BackdoorBench's tools read from us, and the evaluations a run may skip (issue 25).

- every ``*_df_summary.csv`` a defense run writes has the column order BackdoorBench's trainers write (the test
  losses, then ``test_acc, test_asr, test_ra`` last) and ``last`` as its first data row;
- a model evaluated twice with the same weights is scored once (the last monitored epoch and the final result),
  and the monitor is off unless asked for;
- BackdoorBench's fp.py saves ``prune``'s reparametrisation (``weight_orig`` / ``weight_mask``): folded back by hand.
"""
from __future__ import annotations

import csv

import pytest
import torch

from backdoorbench_gic.evaluation import WeightsMemo, evaluate
from backdoorbench_gic.pipeline import DefenseRequest, run_defense
from backdoorbench_gic.results import TEST_TAIL, fold_pruning, load_defense_model
from backdoorbench_gic.testing import make_bb_record

pytestmark = pytest.mark.usefixtures("one_thread")

# every purification defense at its shortest schedule (the CSV layout does not depend on the length)
SHORT = {
    "ft": {"epochs": 1}, "ft-sam": {"epochs": 1}, "fst": {"epochs": 1}, "fp": {"epochs": 1},
    "nad": {"te_epochs": 1, "epochs": 1}, "anp": {"nb_iter": 2}, "clp": {}, "npd": {"epochs": 1, "warm_epochs": 1},
    "i-bau": {"n_rounds": 1, "K": 1}, "sau": {"n_rounds": 1},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("outputs")
    make_bb_record(r, "victim", n_train=80, n_test=30, train_steps=0, model_name="preactresnet18", width=4,
                   trigger_size=8)
    return r


@pytest.mark.parametrize("name", sorted(SHORT))
def test_every_summary_csv_has_backdoorbench_column_order(root, tmp_path, name):
    run_defense(DefenseRequest(result_file="victim", defense=name, bb_root=str(root), device="cpu",
                               output_dir=str(tmp_path / name), monitor_every=1, progress=False,
                               overrides={"reserved_type": "train", "ratio": 0.25, "batch_size": 10, **SHORT[name]}))
    summaries = list((tmp_path / name).glob("*_df_summary.csv"))
    assert summaries, "no summary written"
    for path in summaries:
        rows = list(csv.reader(path.open()))
        assert tuple(rows[0][-3:]) == TEST_TAIL == ("test_acc", "test_asr", "test_ra"), rows[0]
        assert [r[0] for r in rows[1:]] == ["last", "valid_max", "exist_nan_value"]
        header = rows[0]
        for loss in ("clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch"):  # before the metrics
            assert header.index(loss) < header.index("test_acc")


def test_a_model_is_scored_once_per_weights(root):
    from backdoorbench_gic.records import load_attack_record

    rec = load_attack_record("victim", root)
    model = rec.build_model()
    memo = WeightsMemo(rec.clean_test, rec.bd_test)
    first = memo(model)
    assert memo(model) == first and memo.evaluations == 1
    assert first == evaluate(model, rec.clean_test, rec.bd_test)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a changed weight is a new evaluation
    memo(model)
    assert memo.evaluations == 2


def test_monitor_is_opt_in_and_the_last_epoch_is_not_evaluated_twice(root, tmp_path, monkeypatch):
    import backdoorbench_gic.evaluation as ev

    calls = {"n": 0}
    real = ev.evaluate

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate", counting)
    req = dict(result_file="victim", defense="ft", bb_root=str(root), device="cpu", progress=False,
               overrides={"reserved_type": "train", "ratio": 0.25, "batch_size": 10, "epochs": 2})
    assert DefenseRequest(**req).monitor_every == 0
    run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "a")))  # the victim's metrics: cached by content
    calls["n"] = 0
    run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "b")))
    assert calls["n"] == 1  # the final result only
    calls["n"] = 0
    run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "c"), monitor_every=1))
    assert calls["n"] == 2  # epochs 1 and 2; the final result is epoch 2's model, scored once


def test_fold_pruning_by_hand():
    state = {"linear.weight_orig": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
             "linear.weight_mask": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
             "linear.bias": torch.tensor([0.5, -0.5]), "bn.running_mask": torch.tensor([1.0])}
    out = fold_pruning(state)
    assert out["linear.weight"].tolist() == [[1.0, 0.0], [3.0, 0.0]]
    assert set(out) == {"linear.weight", "linear.bias", "bn.running_mask"}
    with pytest.raises(ValueError, match="no linear.weight_mask"):
        fold_pruning({"linear.weight_orig": torch.ones(1)})


def test_load_defense_model_reads_a_pruned_backdoorbench_result(root, tmp_path):
    from backdoorbench_gic.records import load_attack_record

    rec = load_attack_record("victim", root)
    net = rec.build_model().net
    state = dict(net.state_dict())
    w = state.pop("linear.weight")
    mask = torch.ones_like(w)
    mask[:, :3] = 0
    state.update({"linear.weight_orig": w, "linear.weight_mask": mask})
    torch.save({"model_name": rec.model_name, "num_classes": 10, "model": state}, tmp_path / "defense_result.pt")
    model = load_defense_model(tmp_path / "defense_result.pt", rec)
    assert torch.equal(model.net.linear.weight, w * mask)
