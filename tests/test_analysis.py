"""The shared analysis (backdoorbench_gic.analysis): the GIC figures against hand computations, the table
helpers, and the efficacy report's gap tables regenerated from the per-cell CSVs in benchmarks/results/."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from backdoorbench_gic.analysis import (GAP_THRESHOLD, Col, extra_column, frame_table, gic_comparison, md_table,
                                        paired, pm, reference_gaps, share_recovered, spearman,
                                        standard_error)
from backdoorbench_gic.analysis.efficacy import efficacy_report, gap_table, recovery_figures

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def cells() -> pd.DataFrame:
    """Two seeds of one victim purified by ft on reserved and on reserved_noise, without and with GIC."""
    rows = []
    numbers = {  # (aux, seed, gic): (acc_after, asr_after, der)
        ("reserved", 0, False): (0.80, 0.10, 0.90), ("reserved", 0, True): (0.81, 0.12, 0.89),
        ("reserved", 1, False): (0.82, 0.10, 0.92), ("reserved", 1, True): (0.82, 0.10, 0.92),
        ("reserved_noise", 0, False): (0.70, 0.05, 0.85), ("reserved_noise", 0, True): (0.76, 0.07, 0.88),
        ("reserved_noise", 1, False): (0.72, 0.05, 0.87), ("reserved_noise", 1, True): (0.76, 0.07, 0.88),
    }
    for (aux, seed, gic), (acc, asr, der) in numbers.items():
        rows.append({"attack": "v", "defense": "gic-ft" if gic else "ft", "base_defense": "ft", "gic": gic,
                     "aux_type": aux, "aux_size_label": "r0.05", "seed": seed, "acc_before": 0.9, "asr_before": 1.0,
                     "acc_after": acc, "asr_after": asr, "ra_after": 0.5, "der": der,
                     **({extra_column("bn_div_before"): 0.4, extra_column("bn_div_after"): 0.1} if gic else {})})
    return pd.DataFrame(rows)


def test_share_recovered_by_hand():
    assert share_recovered(0.76, 0.71, 0.81) == pytest.approx(0.5)  # loss 0.10, GIC gives back 0.05
    assert share_recovered(0.69, 0.71, 0.81) == pytest.approx(-0.2)  # GIC makes it worse
    assert math.isnan(share_recovered(0.5, 0.25, 0.25 + 0.015625))  # gap below the threshold: no share
    assert share_recovered(0.25 + 0.03125, 0.25, 0.25 + 0.03125) == 1.0
    assert math.isnan(share_recovered(0.5, 0.4, math.nan))  # no reference cell
    out = share_recovered(np.array([0.9, 0.5]), np.array([0.8, 0.5]), np.array([1.0, 0.51]))
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1])
    assert GAP_THRESHOLD == 0.02


def test_paired_and_reference_gaps_by_hand():
    pairs = paired(cells())
    assert len(pairs) == 4 and set(pairs.columns) >= {"acc_after_nogic", "acc_after_gic", "d_der", Col.BN_DIV_AFTER}
    noise0 = pairs[(pairs.aux_type == "reserved_noise") & (pairs.seed == 0)].iloc[0]
    assert noise0.d_acc_after == pytest.approx(0.06) and noise0.d_der == pytest.approx(0.03)
    gaps = reference_gaps(pairs).set_index("aux_type")
    noise, res = gaps.loc["reserved_noise"], gaps.loc["reserved"]
    assert noise.acc_reserved == pytest.approx(0.81) and noise.der_reserved == pytest.approx(0.91)
    assert noise.acc_loss == pytest.approx(0.10) and noise.acc_recovered == pytest.approx(0.5)  # (0.76-0.71)/0.10
    assert noise.der_gap == pytest.approx(0.05) and noise.der_gap_closed == pytest.approx(0.4)  # (0.88-0.86)/0.05
    assert res.acc_loss == pytest.approx(0.0) and math.isnan(res.acc_recovered) and math.isnan(res.der_gap_closed)


def test_gic_comparison_by_hand():
    comp = gic_comparison(cells()).set_index("aux_type")
    noise = comp.loc["reserved_noise"]
    assert noise.n_pairs == 2
    assert noise.der_diff == pytest.approx(0.02) and noise.der_diff_se == pytest.approx(0.01)  # diffs 0.03, 0.01
    assert noise.acc_after_diff == pytest.approx(0.05) and noise.acc_after_diff_se == pytest.approx(0.01)
    assert noise.der_gap_to_reserved == pytest.approx(0.05) and noise.der_gap_closed == pytest.approx(0.4)
    assert math.isnan(comp.loc["reserved", "der_gap_closed"])
    one_sided = cells()[lambda d: ~d.gic]
    assert gic_comparison(one_sided).empty


def test_gic_comparison_and_efficacy_agree_on_the_gap_closed():
    """Both reports compute the DER gap closed with one definition: same number for the same cells."""
    comp = gic_comparison(cells()).set_index("aux_type")
    gaps = reference_gaps(paired(cells())).set_index("aux_type")
    assert comp.loc["reserved_noise", "der_gap_closed"] == pytest.approx(gaps.loc["reserved_noise", "der_gap_closed"])
    text, _, verdict = efficacy_report(cells())
    assert verdict["der_gap_cells"] == 1 and verdict["der_gap_closed_mean"] == pytest.approx(0.4)
    assert verdict["acc_loss_cells"] == 1 and verdict["acc_recovered_mean"] == pytest.approx(0.5)
    assert verdict["asr_rise_on_those"] == pytest.approx(0.02)
    assert "| C-Acc recovered on shifted sets losing > 2 pts | 1 of 1 cells | 50 % | >= 50 % | ok |" in text
    assert "| DER gap closed where the gap > 0.02 | 1 of 1 cells | 40 % | >= 50 % | MISS |" in text


def test_success_figures_by_hand():
    """Success = ASR <= 10 % and C-Acc within 5 points of the victim (0.90), per paired run of the shifted sets."""
    from backdoorbench_gic.analysis.efficacy import success_figures, success_table

    df = cells().set_index(["aux_type", "seed", "gic"])
    df.loc[("reserved_noise", 0, False), ["acc_after", "asr_after"]] = (0.87, 0.05)  # success
    df.loc[("reserved_noise", 0, True), ["acc_after", "asr_after"]] = (0.88, 0.12)  # ASR above 10 %: lost
    df.loc[("reserved_noise", 1, False), ["acc_after", "asr_after"]] = (0.70, 0.05)  # 20 points down: failure
    df.loc[("reserved_noise", 1, True), ["acc_after", "asr_after"]] = (0.86, 0.05)  # 4 points down: gained
    pairs = paired(df.reset_index())
    fig = success_figures(pairs, reference_gaps(pairs))
    # the noise cell loses (0.81 - (0.87 + 0.70) / 2) = 2.5 points against reserved: lossy, so both readings agree
    for p in ("success", "lossy_success"):
        assert (fig[f"{p}_runs"], fig[f"{p}_gained"], fig[f"{p}_lost"]) == (2, 1, 1)
        assert fig[f"{p}_rate_nogic"] == 0.5 and fig[f"{p}_rate_gic"] == 0.5
    assert "| shifted sets | 2 | 50.0 % | 50.0 % | 1 | 1 |" in success_table(fig)
    df.loc[("reserved_noise", 1, False), "acc_after"] = 0.76  # loss 0.005: not lossy any more
    pairs = paired(df.reset_index())
    fig = success_figures(pairs, reference_gaps(pairs))
    assert fig["lossy_success_runs"] == 0 and math.isnan(fig["lossy_success_rate_gic"]) and fig["success_runs"] == 2


def test_table_cells_by_hand():
    assert pm(0.1234, 0.0056) == "12.3 ± 0.6"
    assert pm(-0.02, math.nan, sign=True) == "-2.0"
    assert pm(0.5, 0.01, 1, 3, sign=True) == "+0.500 ± 0.010"
    assert pm(math.nan, 0.1) == "-"
    assert standard_error(pd.Series([0.03, 0.01, math.nan])) == pytest.approx(0.01)
    assert math.isnan(standard_error(pd.Series([0.5])))
    assert md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    assert frame_table(pd.DataFrame({"a": [0.12345], "b": ["s"]}), {"a": 2}) == "| a | b |\n|---|---|\n| 0.12 | s |"


def test_spearman_by_hand_over_complete_pairs():
    """Rank differences (0, 1, 1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8. A pair with a NaN on either side is left out
    before ranking (ranking a's five values first would give other ranks). Ties share their mean rank: ranks
    (1.5, 1.5, 3, 4) against (1, 2, 3, 4) give cov 4.5 / sqrt(4.5 * 5) = sqrt(0.9)."""
    nan = math.nan
    assert spearman(pd.Series([1, 2, 3, 4]), pd.Series([1, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(pd.Series([1, 2, nan, 30, 40, 5]), pd.Series([1, 3, 7, 2, 4, nan])) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, nan], [1, 2, 3]))  # two complete pairs: too few to rank
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))  # a constant side
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2, 3], [1, 2])


STORED = sorted(RESULTS.glob("efficacy_*.csv"))


@pytest.mark.parametrize("csv", STORED, ids=[p.stem for p in STORED])
def test_stored_efficacy_figures_recompute(csv):
    """Each stored per-cell CSV's recovery columns follow from its mean columns by share_recovered."""
    g = pd.read_csv(csv)
    np.testing.assert_allclose(g.acc_loss, g.acc_reserved - g.acc_after_nogic, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g.der_gap, g.der_reserved - g.der_nogic, rtol=0, atol=1e-12)
    np.testing.assert_allclose(share_recovered(g.acc_after_gic, g.acc_after_nogic, g.acc_reserved), g.acc_recovered,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(share_recovered(g.der_gic, g.der_nogic, g.der_reserved), g.der_gap_closed,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("csv", STORED, ids=[p.stem for p in STORED])
def test_stored_efficacy_report_regenerates(csv):
    """The report's per-victim gap table, rendered from the stored CSV, is the stored report's, byte for byte, and
    the headline figures of its targets table follow from the CSV."""
    gaps = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    md = csv.with_suffix(".md").read_text()
    assert gap_table(gaps) in md
    fig = recovery_figures(gaps)
    shown = re.search(r"\| C-Acc recovered on shifted sets losing > 2 pts \| (\d+) of (\d+) cells \| (\S+)", md)
    assert (int(shown[1]), int(shown[2])) == (fig["acc_loss_cells"], fig["shifted_cells"])
    assert shown[3] == pm(fig["acc_recovered_mean"], math.nan, digits=0)
    shown = re.search(r"\| DER gap closed where the gap > 0.02 \| (\d+) of \d+ cells \| (\S+)", md)
    assert int(shown[1]) == fig["der_gap_cells"] and shown[2] == pm(fig["der_gap_closed_mean"], math.nan, digits=0)


def test_finished_cells_walk_rows_purified_models_and_victims(bb_record, tmp_path):
    """Cells under <output_root>/cells are finished once result.json exists; each gives its row, its pairing key and
    its purified weights (safe loader), and each victim's record is loaded once."""
    from backdoorbench_gic.analysis import Victims, finished_cells
    from backdoorbench_gic.results import write_defense_result, write_tidy_row

    root, _ = bb_record
    state = {"w": torch.arange(4.0)}
    for i, gic in enumerate((False, True)):
        cell = tmp_path / "out" / "cells" / f"c{i}"
        write_defense_result(cell, csv_prefix="ft", model_name="m", num_classes=2, state_dict=state,
                             history=[{"epoch": 1, "test_acc": 0.5}], plots=False)
        write_tidy_row(cell, {"attack": "badnet_fixture", "defense": "gic-ft" if gic else "ft", "base_defense": "ft",
                              "gic": gic, "aux_type": "train", "seed": 0})
    (tmp_path / "out" / "cells" / "unfinished").mkdir()  # no result.json: not a finished cell
    cells = list(finished_cells(tmp_path / "out"))
    assert [c.row["cell_dir"] for c in cells] == ["cells/c0", "cells/c1"]
    assert [c.gic for c in cells] == [False, True] and cells[0].pair_key == cells[1].pair_key
    assert torch.equal(cells[1].purified_state()["w"], state["w"])
    victims = Victims(root)
    first = victims.record("badnet_fixture")
    assert victims.record("badnet_fixture") is first
    calls = []
    assert victims.derived("badnet_fixture", "n", lambda r: calls.append(1) or r.num_classes) == 10
    assert victims.derived("badnet_fixture", "n", lambda r: calls.append(1) or 0) == 10 and calls == [1]


def test_gic_reports_every_key_the_analysis_reads(bb_record):
    """The column names the reports read (analysis.keys.GicInfo) are the keys GIC reports: a rename on either side
    fails here instead of turning table cells into '-'."""
    from backdoorbench_gic.analysis import GicInfo
    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.gic.calibration import GIC
    from backdoorbench_gic.records import load_attack_record

    root, _ = bb_record
    record = load_attack_record("badnet_fixture", root)
    victim = record.build_model().eval()
    aux = build_aux_set(record, "train", n_per_class=2, ratio=None, seed=0)
    gic = GIC({"gic_steps": 2, "gic_cache": False})
    gic.fit(victim, aux, device="cpu", seed=0)
    reported = {**gic.info, **gic.summary}
    defense_level = (GicInfo.BASE_SECONDS, GicInfo.PLACEMENT_SECONDS)  # the gic defense's, not the fit's
    wanted = [v for k, v in vars(GicInfo).items() if k.isupper() and v not in defense_level]
    assert not [k for k in wanted if k not in reported], sorted(reported)


def test_command_line_names_the_script_from_the_repository_root(monkeypatch):
    """A benchmark records how it was started without the machine's path to the script."""
    from backdoorbench_gic.analysis import command_line

    assert command_line("/home/someone/clone/benchmarks/gic16.py", ["--only", "dev"]) == \
        "python benchmarks/gic16.py --only dev"
    monkeypatch.setattr("sys.argv", ["/abs/benchmarks/speed.py", "--reps", "3"])
    assert command_line("/abs/benchmarks/speed.py") == "python benchmarks/speed.py --reps 3"
    assert command_line("benchmarks/attacks.py", []) == "python benchmarks/attacks.py"


def test_percent_by_hand():
    from backdoorbench_gic.analysis import percent

    assert percent(0.1234) == "12" and percent(0.1234, 1) == "12.3" and percent(-0.02, 1, sign=True) == "-2.0"
    assert percent(0.005, 1, sign=True) == "+0.5"
    assert percent(None) == "-" and percent(math.nan, 2) == "-"


def test_update_json_keeps_other_writers_keys(tmp_path):
    import json

    from backdoorbench_gic.utils.io import update_json

    path = tmp_path / "summary.json"
    update_json(path, {"issue16": {"selected": None}, "generated": "a"})
    update_json(path, {"issue23": {"chosen": None}, "generated": "b"})
    assert json.loads(path.read_text()) == {"issue16": {"selected": None}, "issue23": {"chosen": None}, "generated": "b"}
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not an object"):
        update_json(path, {"x": 1})
    assert path.read_text() == "[1, 2]\n"  # left as it was
