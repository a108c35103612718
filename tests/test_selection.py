"""The selection rules of issue 16's protocols (backdoorbench_gic.analysis.selection) against hand-computed figures,
and the one-sided no-harm verdict of the efficacy report."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from backdoorbench_gic.analysis import Col, extra_column
from backdoorbench_gic.analysis.efficacy import efficacy_report
from backdoorbench_gic.analysis.selection import (Rule, by_base, calibration_cost, confirm, confirmed, select,
                                                  variant_figures)
from backdoorbench_gic.keys import GicInfo


def cells(reserved_der_gic: float = 0.90, base: str = "ft") -> pd.DataFrame:
    """One victim, one seed: reserved and reserved_noise without and with GIC (reserved's DER with GIC given)."""
    numbers = {("reserved", False): (0.80, 0.10, 0.90, 20.0), ("reserved", True): (0.80, 0.10, reserved_der_gic, 20.0),
               ("reserved_noise", False): (0.70, 0.05, 0.85, 30.0), ("reserved_noise", True): (0.76, 0.065, 0.88, 30.0)}
    rows = []
    for (aux, gic), (acc, asr, der, secs) in numbers.items():
        rows.append({"attack": "v", "defense": f"gic-{base}" if gic else base, "base_defense": base, "gic": gic,
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
