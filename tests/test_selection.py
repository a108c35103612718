"""The selection rules of issue 16's protocols (backdoorbench_gic.analysis.selection) and the pooling of its blocks
(backdoorbench_gic.analysis.protocols) against hand-computed figures, and the one-sided no-harm verdict of the
efficacy report."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from backdoorbench_gic.analysis import Col, extra_column
from backdoorbench_gic.analysis.efficacy import efficacy_report
from backdoorbench_gic.analysis.selection import (Rule, by_base, calibration_cost, confirm, confirmed, select,
                                                  variant_figures)
from backdoorbench_gic.keys import GicInfo


def cells(reserved_der_gic: float = 0.90, base: str = "ft", attack: str = "v", noise_acc: float = 0.76,
          noise_asr: float = 0.065) -> pd.DataFrame:
    """One victim, one seed: reserved and reserved_noise without and with GIC (reserved's DER with GIC given; noise's
    C-Acc and ASR with GIC given)."""
    numbers = {("reserved", False): (0.80, 0.10, 0.90, 20.0), ("reserved", True): (0.80, 0.10, reserved_der_gic, 20.0),
               ("reserved_noise", False): (0.70, 0.05, 0.85, 30.0),
               ("reserved_noise", True): (noise_acc, noise_asr, 0.88, 30.0)}
    rows = []
    for (aux, gic), (acc, asr, der, secs) in numbers.items():
        rows.append({"attack": attack, "defense": f"gic-{base}" if gic else base, "base_defense": base, "gic": gic,
                     "aux_type": aux, "aux_size_label": "r0.05", "seed": 0, "acc_before": 0.9, "asr_before": 1.0,
                     "acc_after": acc, "asr_after": asr, "ra_after": 0.5, "der": der, Col.DEFENSE_SECONDS: secs,
                     **({extra_column(GicInfo.SECONDS): 4.0 if aux == "reserved" else 2.0,
                         extra_column(GicInfo.PLACEMENT_SECONDS): 1.0 if aux == "reserved" else math.nan}
                        if gic else {})})
    return pd.DataFrame(rows)


def test_one_sided_no_harm_by_hand():
    # reserved's DER with GIC: +0.03 (an improvement), -0.005 (within both bounds), -0.03 (harm either way)
    for der, symmetric, one_sided in ((0.93, False, True), (0.895, True, True), (0.87, False, False)):
        _, _, verdict = efficacy_report(cells(der))
        assert (verdict["no_harm"], verdict["no_harm_one_sided"]) == (symmetric, one_sided), der


def test_calibration_cost_by_hand():
    # base seconds: mean(20, 30) = 25; fit seconds mean(4, 2) = 3; placement seconds mean(1, 0) = 0.5 (NaN counts 0)
    assert calibration_cost(cells()) == pytest.approx(3.5 / 25)
    assert math.isnan(calibration_cost(cells().drop(columns=[Col.DEFENSE_SECONDS])))


def test_variant_figures_by_hand():
    fig, gaps = variant_figures(cells(0.93))
    assert fig["pairs"] == 2 and fig["acc_loss_cells"] == 1
    assert fig["acc_recovered_mean"] == pytest.approx(0.6)  # (0.76 - 0.70) / (0.80 - 0.70)
    assert fig["asr_rise_on_those"] == pytest.approx(0.015)
    assert fig["der_gap_closed_mean"] == pytest.approx(0.6)  # (0.88 - 0.85) / (0.90 - 0.85)
    assert fig["cost"] == pytest.approx(0.14) and fig["no_harm_one_sided"] and not fig["no_harm"]
    assert len(gaps) == 2


def test_rule_reasons_and_eligibility():
    fig = {"acc_loss_cells": 8, "acc_recovered_mean": 0.5, "asr_rise_on_those": -0.02, "der_gap_closed_mean": 0.65,
           "no_harm": False, "no_harm_one_sided": True, "cost": 0.02}
    assert Rule().reasons(fig) == ["harm on train/reserved (symmetric bound)"]
    per_base = Rule(one_sided_harm=True, min_recovered=0.0, min_lossy_cells=4)
    assert per_base.eligible(fig)
    assert per_base.reasons({**fig, "acc_loss_cells": 3, "acc_recovered_mean": -0.04, "asr_rise_on_those": 0.011}) == [
        "3 lossy cells (< 4)", "C-Acc recovered -4 % (not > 0 %)", "ASR change +1.1 pts (> +1)"]
    assert per_base.reasons({**fig, "acc_recovered_mean": None, "asr_rise_on_those": None})[0] == \
        "C-Acc recovered n/a (not > 0 %)"
    assert Rule(asr_rise_limit=0.01).eligible({**fig, "no_harm": True, "asr_rise_on_those": 0.01})


def fig(rec, gap, cost=0.1, rise=0.0):
    return {"acc_loss_cells": 5, "acc_recovered_mean": rec, "asr_rise_on_those": rise, "der_gap_closed_mean": gap,
            "no_harm": True, "no_harm_one_sided": True, "cost": cost}


def test_select_by_hand():
    rule = Rule()
    # c recovers most but raises ASR 2 points; a and b tie (within 5 points); b closes more of the DER gap
    assert select({"a": fig(0.50, 0.2), "b": fig(0.47, 0.6), "c": fig(0.9, 0.9, rise=0.02)}, rule) == "b"
    # outside the tie the recovery decides; within it, equal gaps: the calibration-free one, then the cheaper
    assert select({"a": fig(0.50, 0.2), "b": fig(0.40, 0.9)}, rule) == "a"
    assert select({"a": fig(0.50, 0.2, cost=0.01), "bn-reset": fig(0.49, 0.2, cost=0.0)}, rule,
                  calibration_free=("bn-reset",)) == "bn-reset"
    assert select({"a": fig(0.50, 0.2, cost=0.2), "b": fig(0.49, 0.2, cost=0.1)}, rule) == "b"
    assert select({"a": fig(0.50, None), "b": fig(0.49, 0.1)}, rule) == "b"  # no gap cell counts below any gap
    assert select({"c": fig(0.9, 0.9, rise=0.02)}, rule) is None
    assert select({}, rule) is None


def test_confirm_by_hand():
    good = {**fig(0.62, 0.7, cost=0.03, rise=-0.027), "der_gap_cells": 2}
    checks = confirm(good)
    assert confirmed(checks) and set(checks.values()) == {"ok"}
    assert confirm({**good, "der_gap_cells": 0})["DER gap closed >= 50 %"] == "n/a (no gap cell)"
    assert confirmed(confirm({**good, "der_gap_cells": 0}))
    bad = confirm({**good, "acc_loss_cells": 2, "asr_rise_on_those": 0.05, "cost": 0.3, "no_harm_one_sided": False})
    assert [k for k, v in bad.items() if v == "MISS"] == ["lossy cells", "mean ASR change <= +1 pt",
                                                         "no harm (one-sided)", "cost <= +25 %"]
    assert not confirmed(bad)
    # issue 23's success target: the lossy runs' success rate rises by at least the margin
    key = "success rate +10 pts on lossy cells"
    assert key not in confirm(good)
    assert confirm({**good, "lossy_success_rate_nogic": 0.2, "lossy_success_rate_gic": 0.3}, success_margin=0.1)[key] == "ok"
    assert confirm({**good, "lossy_success_rate_nogic": 0.2, "lossy_success_rate_gic": 0.29},
                   success_margin=0.1)[key] == "MISS"
    assert confirm(good, success_margin=0.1)[key] == "MISS"  # no lossy runs: nothing confirmed


def test_by_base_splits_the_paired_frame():
    both = pd.concat([cells(base="ft"), cells(base="sau")], ignore_index=True)
    parts = by_base(both)
    assert sorted(parts) == ["ft", "sau"] and all(len(p) == 4 for p in parts.values())
    assert set(parts["sau"][Col.BASE_DEFENSE]) == {"sau"}


# ---- pooling over blocks (analysis.protocols) ----
from backdoorbench_gic.analysis.protocols import (first_protocol, paired_frame, per_base_protocol, pooled_figures,  # noqa: E402
                                                  shifted_changes, study_blocks, variant_label)


def frames():
    """Two development blocks (victims v and w) and one held-out block (victim h), variants good and bad:
    good raises noise's ASR 0.5 points, bad 1.5 (over the 1-point limit). C-Acc recovered on the one lossy cell:
    v (0.76 - 0.70) / (0.80 - 0.70) = 0.6, w (0.75 - 0.70) / 0.10 = 0.5, h 0.7."""
    def block(attack, acc):
        return {"good": cells(0.895, attack=attack, noise_acc=acc, noise_asr=0.055),
                "bad": cells(0.895, attack=attack, noise_acc=acc)}
    return {"A": block("v", 0.76), "B": {**block("w", 0.75), "only-b": cells(0.895, attack="w")}, "C": block("h", 0.77)}


def test_pooled_figures_by_hand():
    f = frames()
    pooled = pooled_figures(f, ["A", "B"])
    assert sorted(pooled) == ["bad", "good"]  # only-b: not run by every block
    assert pooled["good"]["acc_loss_cells"] == 2 and pooled["good"]["acc_recovered_mean"] == pytest.approx(0.55)
    assert pooled["good"]["asr_rise_on_those"] == pytest.approx(0.005) and pooled["good"]["eligible"]
    assert pooled["bad"]["asr_rise_on_those"] == pytest.approx(0.015) and not pooled["bad"]["eligible"]
    assert pooled["good"]["pairs"] == 4 and pooled["good"]["cost"] == pytest.approx(3.5 / 25)
    assert pooled_figures(f, ["A"]) == {}  # one block pools nothing


def test_first_protocol_by_hand():
    pooled, chosen = first_protocol(frames(), ["A", "B"], ["C"])
    assert chosen == "good" and set(pooled) == {("development", "good"), ("development", "bad")}
    # one development block: its own figures decide; none eligible: None
    _, chosen = first_protocol(frames(), ["C"], [])
    assert chosen == "good"
    assert first_protocol({"A": {"bad": frames()["A"]["bad"]}}, ["A"], [])[1] is None


def test_per_base_protocol_by_hand():
    from backdoorbench_gic.analysis.selection import Rule

    dev = {"A": {"g": pd.concat([cells(0.895, base="ft", noise_asr=0.055), cells(0.895, base="sau", noise_acc=0.69)],
                                ignore_index=True)}}
    fresh = {"F": {"g": cells(0.895, base="sau", attack="x", noise_acc=0.77, noise_asr=0.055)}}
    pb = per_base_protocol({**dev, **fresh}, ["A"], ["F"], Rule(one_sided_harm=True, min_recovered=0.0))
    # ft: 60 % recovered, ASR +0.5: selected, but no fresh ft cell to confirm on; sau: -10 % recovered (not > 0)
    assert pb["ft"]["selected"] == "g" and pb["ft"]["checks"] is None and not pb["ft"]["confirmed"]
    assert pb["sau"]["selected"] is None and pb["sau"]["development"]["g"]["not_eligible_because"][0].startswith(
        "C-Acc recovered -10 %")
    assert pb["sau"]["fresh"]["g"]["acc_recovered_mean"] == pytest.approx(0.7) and pb["sau"]["checks"] is None
    pb = per_base_protocol({"A": {"g": dev["A"]["g"][lambda d: d.base_defense == "ft"]},
                            "F": {"g": cells(0.895, base="ft", attack="x", noise_acc=0.77, noise_asr=0.055)}},
                           ["A"], ["F"], Rule(one_sided_harm=True, min_recovered=0.0))
    # confirmed on everything but the number of lossy cells (1 of the 3 the confirmation asks for)
    assert [k for k, v in pb["ft"]["checks"].items() if v == "MISS"] == ["lossy cells"] and not pb["ft"]["confirmed"]


def test_paired_frame_and_shifted_changes_by_hand():
    df = cells()
    both = paired_frame(df, df)
    assert len(both) == 4 and both[Col.GIC].sum() == 2
    _, gaps = variant_figures(both)
    ch = shifted_changes(gaps)
    assert list(ch.index) == [("v", "ft")]
    assert ch.loc[("v", "ft"), "dacc"] == pytest.approx(6.0) and ch.loc[("v", "ft"), "dasr"] == pytest.approx(1.5)


def test_variant_label():
    assert variant_label({}) == "before" and variant_label({"placement": "bn-after"}) == "bn-after"
    assert variant_label({"placement": "before", "family": "generator"}) == "before+generator"
    assert variant_label({"family": "prompt", "placement": "both"}) == "both"


def test_study_blocks_pair_variants_with_their_block(tmp_path):
    import yaml

    from backdoorbench_gic.config import ConfigError

    def write(name, data):
        (tmp_path / name).write_text(yaml.safe_dump(data, sort_keys=False))
        return tmp_path / name

    base = {"name": "s-dev", "role": "development", "output_root": "runs/s-dev", "attacks": ["v"],
            "defenses": [{"name": "ft", "overrides": {"epochs": 2}}], "aux": ["reserved", "reserved_noise"],
            "seeds": [0, 1], "gic": {"off": None, "default": {}, "bn-after": {"placement": "bn-after"}}}
    paths = [write("dev.yaml", base),
             write("dev_more.yaml", {"_base_": "dev.yaml", "seeds": [0], "gic": {"_delete_": True,
                                                                                  "bn-transfer": {"placement": "bn-transfer"},
                                                                                  "bn-transfer-first1": {"placement": "bn-transfer", "bn_transfer_layers": 1}}}),
             write("held.yaml", {"_base_": "dev.yaml", "name": "s-held", "role": "held-out", "output_root": "runs/s-held",
                                 "gic": {"_delete_": True, "off": None, "default": {"family": "generator"}}})]
    blocks = study_blocks(paths)
    assert list(blocks) == ["dev", "held"] and blocks["held"].role == "held-out"
    assert list(blocks["dev"].variants) == ["before", "bn-after", "bn-transfer-first1", "bn-transfer"]
    assert blocks["dev"].variants["bn-transfer"].output_root == tmp_path / "runs" / "s-dev-bn-transfer"
    assert blocks["dev"].files["bn-transfer"] == tmp_path / "dev_more.yaml"
    assert list(blocks["held"].variants) == ["before+generator"]
    # a variants-only file whose cells would not pair: another schedule than its block's uncalibrated cells ran
    bad = write("dev_bad.yaml", {"_base_": "dev.yaml", "defenses": [{"name": "ft", "overrides": {"epochs": 3}}],
                                 "gic": {"_delete_": True, "x": {}}})
    with pytest.raises(ConfigError, match="do not pair with dev.yaml's uncalibrated ones.*no uncalibrated twin"):
        study_blocks(paths + [bad])
    drift = write("dev_drift.yaml", {"_base_": "dev.yaml", "defaults": {"device": "cpu"}, "gic": {"_delete_": True, "x": {}}})
    with pytest.raises(ConfigError, match="differs in overrides"):
        study_blocks(paths + [drift])
    with pytest.raises(ConfigError, match="needs a role"):
        study_blocks([write("norole.yaml", {k: v for k, v in base.items() if k != "role"})])
