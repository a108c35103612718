"""The matrix report reads well with one seed and one defense: no "± 0.00" spread that was never measured, every
metric in percent, a heatmap that keeps its labels with one row."""
from __future__ import annotations

import math

import pandas as pd

from backdoorbench_gic.matrix.report import _fmt, _plots, leaderboard


def _cells(seeds=(0,), defenses=("ft",), aux=("reserved", "reserved_noise")) -> pd.DataFrame:
    rows = []
    for d in defenses:
        for a in aux:
            for s in seeds:
                rows.append({"model": "m", "attack": "badnet", "defense": d, "defense_label": d, "gic": False,
                             "aux_type": a, "aux_size_label": "default", "seed": s, "acc_before": 0.9,
                             "asr_before": 1.0, "ra_before": 0.0, "acc_after": 0.85 + 0.01 * s,
                             "asr_after": 0.10 + 0.02 * s, "ra_after": 0.8, "der": 0.925 - 0.01 * s})
    return pd.DataFrame(rows)


def test_one_seed_shows_the_mean_alone_in_percent():
    assert _fmt(0.925, math.nan) == "92.50"
    assert _fmt(0.925, 0.01) == "92.50 ± 1.00"
    assert _fmt(math.nan, math.nan) == "-"
    _, header, rows = leaderboard(_cells(aux=("reserved",)))
    cells = dict(zip(header, rows[0]))
    assert cells["ft DER"] == "92.50" and cells["ft C-Acc"] == "85.00" and cells["no defense ASR"] == "100.00"
    assert not any("±" in c for c in rows[0])


def test_several_seeds_show_the_spread_in_percent():
    numeric, header, rows = leaderboard(_cells(seeds=(0, 1), aux=("reserved",)))
    cells = dict(zip(header, rows[0]))
    # DER 0.925 and 0.915: mean 92.00, sample std 0.707 points
    assert cells["ft DER"] == "92.00 ± 0.71"
    assert abs(numeric.loc[0, "ft_DER_mean"] - 0.92) < 1e-12  # the csv keeps fractions


def test_heatmap_with_one_row_stays_readable(tmp_path):
    from PIL import Image

    written = _plots(_cells(), tmp_path)
    heat = Image.open(next(p for p in written if p.name == "der_heatmap.png"))
    width, height = heat.size
    assert height >= 2.6 * 110 - 1 and width >= 4.0 * 110 - 1  # the minimum figure size at 110 dpi
