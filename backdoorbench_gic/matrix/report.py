"""``bbgic matrix report``: tables and plots from the finished cells, with no GPU and no model in sight.

- ``results.csv``: the tidy table, one row per cell (fractions in [0,1]);
- ``leaderboard_<aux>@<size>.{csv,md,tex}``: BackdoorBench's layout, rows model x attack, columns
  defense x {C-Acc, ASR, RA, DER}, mean +- std over seeds (percent in md/tex, the mean alone for a single seed;
  the csv keeps fractions);
- ``gic_comparison.{csv,md}``: per attack, base defense, auxiliary type and size, the means without and with
  GIC, the paired difference (mean +- standard error over seeds) and the share of the DER gap to ``reserved``
  that GIC closes (gic-method.md section 1; only where that gap exceeds 0.02);
- ``der_heatmap[_gic].png`` (defense x auxiliary type, DER in %) and ``acc_vs_asr.png`` (one panel per defense).
Markdown and LaTeX are written here directly (no tabulate/jinja2 dependency).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..analysis import finished_cells, gic_comparison, markdown_table  # noqa: F401  (re-exported)
from ..analysis.tables import pm
from ..utils.io import atomic_write_text, atomic_write_with

log = logging.getLogger(__name__)

METRICS = [("acc_after", "C-Acc"), ("asr_after", "ASR"), ("ra_after", "RA"), ("der", "DER")]
# the post-purification probes' columns (probes.py), shown where a run has them: per defense, and for the victim
# ("no defense") and the clean control; ASR (half) is plain ASR on the images ASR-refresh is measured on
PROBE_METRICS = [("asr_half_after", "ASR (half)"), ("asr_refresh_after", "ASR-refresh"), ("p_asr_after", "P-ASR")]
PROBE_VICTIM = [("asr_half_before", "ASR (half)"), ("asr_refresh_before", "ASR-refresh"), ("p_asr_before", "P-ASR")]
PROBE_CONTROL = [("p_asr_control", "clean model P-ASR")]


def collect_results(output_root: str | Path) -> pd.DataFrame:
    """Every finished cell's result.json under ``<output_root>/cells``."""
    df = pd.DataFrame([cell.row for cell in finished_cells(output_root)])
    if not df.empty:
        for col in ("gic",):
            if col not in df:
                df[col] = False
        if "defense_label" not in df:
            df["defense_label"] = df["defense"]
        if "aux_size_label" not in df:
            df["aux_size_label"] = "default"
        for warning in mixed_configs(df):
            log.warning("%s", warning)
    return df


def mixed_configs(df: pd.DataFrame) -> list[str]:
    """One line per matrix entry whose finished cells were computed with different resolved configurations
    (``config_fingerprint``): a packaged yaml changed under a run that resumed. Their numbers do not belong in
    one table; delete the older cells (or give the entry explicit overrides) and resume."""
    if "config_fingerprint" not in df:
        return []
    out = []
    keys = [k for k in ("dataset", "defense_label", "gic") if k in df]
    for key, g in df.dropna(subset=["config_fingerprint"]).groupby(keys):
        prints = g["config_fingerprint"].value_counts()
        if len(prints) > 1:
            where = ", ".join(f"{fp} ({n} cells)" for fp, n in prints.items())
            out.append(f"{' / '.join(map(str, key))}: cells computed with {len(prints)} different configurations "
                       f"[{where}]; delete the stale cells and resume, or pin the settings in the entry's overrides")
    return out


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.dropna().astype(float)
    if v.empty:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan  # one seed: no spread to show


def _fmt(mean: float, std: float) -> str:
    """``mean ± std`` in percent; the mean alone where there is one seed (std NaN), ``-`` where there is none."""
    return pm(mean, std, scale=100.0, digits=2)


def _tex_escape(s: object) -> str:
    out = str(s)
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("±", "$\\pm$")):
        out = out.replace(a, b)
    return out


def latex_table(header: Sequence[str], rows: Iterable[Sequence[object]], caption: str = "") -> str:
    cols = "l" * len(header)
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"\\caption{{{_tex_escape(caption)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def leaderboard(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[list[str]]]:
    """Numeric frame (mean/std per defense x metric) plus header and rows for md/tex, for one aux setting."""
    defenses = sorted(df.apply(lambda r: r["defense_label"] + ("+gic" if r["gic"] else ""), axis=1).unique())
    df = df.assign(col=df.apply(lambda r: r["defense_label"] + ("+gic" if r["gic"] else ""), axis=1))
    has = lambda cols: [(c, n) for c, n in cols if c in df and df[c].notna().any()]  # noqa: E731
    # (numeric prefix, column, name) of the victim's ("no defense") cells and the clean control's
    fixed = [("none", c, n) for c, n in [("acc_before", "C-Acc"), ("asr_before", "ASR"), ("ra_before", "RA")]
             + has(PROBE_VICTIM)] + [("control", c, n) for c, n in has(PROBE_CONTROL)]
    metrics = METRICS + has(PROBE_METRICS)
    numeric_rows, text_rows = [], []
    header = ["model", "attack"] + [f"no defense {n}" if p == "none" else n for p, _, n in fixed]
    for d in defenses:
        header += [f"{d} {name}" for _, name in metrics]
    for (model, attack), g in df.groupby(["model", "attack"], sort=True):
        nrow: dict[str, object] = {"model": model, "attack": attack}
        trow: list[str] = [model, attack]
        for prefix, col, name in fixed:
            m, s = _mean_std(g[col])
            nrow[f"{prefix}_{name}_mean"], nrow[f"{prefix}_{name}_std"] = m, s
            trow.append(_fmt(m, s))
        for d in defenses:
            gd = g[g["col"] == d]
            for col, name in metrics:
                m, s = _mean_std(gd[col]) if not gd.empty else (math.nan, math.nan)
                nrow[f"{d}_{name}_mean"], nrow[f"{d}_{name}_std"] = m, s
                nrow[f"{d}_n"] = len(gd)
                trow.append(_fmt(m, s))
        numeric_rows.append(nrow)
        text_rows.append(trow)
    return pd.DataFrame(numeric_rows), header, text_rows


def write_report(output_root: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> list[Path]:
    output_root = Path(output_root)
    out = Path(out_dir) if out_dir else output_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = collect_results(output_root)
    if df.empty:
        raise FileNotFoundError(f"no finished cells under {output_root / 'cells'}: run `bbgic matrix run` first")
    written: list[Path] = []
    written.append(atomic_write_with(out / "results.csv", lambda p: df.to_csv(p, index=False)))
    warnings = mixed_configs(df)
    if warnings:
        written.append(atomic_write_text(out / "WARNINGS.md", "# Mixed configurations\n\n"
                                         + "".join(f"- {w}\n" for w in warnings)))
    elif (out / "WARNINGS.md").exists():
        (out / "WARNINGS.md").unlink()
    for (aux, size), g in df.groupby(["aux_type", "aux_size_label"], sort=True):
        tag = f"{aux}@{size}".replace(":", "_").replace("/", "_")
        numeric, header, rows = leaderboard(g)
        written.append(atomic_write_with(out / f"leaderboard_{tag}.csv", lambda p: numeric.to_csv(p, index=False)))
        caption = (f"auxiliary data {aux} ({size}); C-Acc, ASR, RA and DER in %; mean ± std over "
                   f"{g['seed'].nunique()} seed(s), the mean alone where a cell has one")
        if any(h.endswith(("ASR-refresh", "P-ASR")) for h in header):
            caption += ("; probes: ASR-refresh after BatchNorm re-estimation on the test split's first half, measured "
                        "on its second half beside ASR (half) on the same images; P-ASR after the retuning attack")
        written.append(atomic_write_text(out / f"leaderboard_{tag}.md", f"**{caption}**\n\n" + markdown_table(header, rows)))
        written.append(atomic_write_text(out / f"leaderboard_{tag}.tex", latex_table(header, rows, caption)))
    comp = gic_comparison(df)
    if not comp.empty:
        written.append(atomic_write_with(out / "gic_comparison.csv", lambda p: comp.to_csv(p, index=False)))
        header = ["attack", "defense", "aux", "size", "pairs", "C-Acc no GIC", "C-Acc GIC", "dC-Acc", "ASR no GIC",
                  "ASR GIC", "dASR", "DER no GIC", "DER GIC", "dDER", "gap closed"]

        def diff(m, se):  # paired difference in percentage points, ± its standard error where there are 2+ seeds
            return pm(m, se, scale=100.0, digits=2, sign=True)

        rows = [[r.attack, r.base_defense, r.aux_type, r.aux_size_label, r.n_pairs, f"{r.acc_after_nogic * 100:.2f}",
                 f"{r.acc_after_gic * 100:.2f}", diff(r.acc_after_diff, r.acc_after_diff_se),
                 f"{r.asr_after_nogic * 100:.2f}", f"{r.asr_after_gic * 100:.2f}", diff(r.asr_after_diff, r.asr_after_diff_se),
                 f"{r.der_nogic * 100:.2f}", f"{r.der_gic * 100:.2f}", diff(r.der_diff, r.der_diff_se),
                 "-" if r.der_gap_closed != r.der_gap_closed else f"{r.der_gap_closed * 100:.0f}%"]
                for r in comp.itertuples()]
        written.append(atomic_write_text(out / "gic_comparison.md", markdown_table(header, rows)))
    if plots:
        written += _plots(df, out)
    return written


def _plots(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    for gic, g in df.groupby("gic"):
        pivot = g.pivot_table(index="defense_label", columns="aux_type", values="der", aggfunc="mean") * 100.0
        rows, cols = pivot.shape
        # cells of at least ~0.45 inch, and room for the rotated labels, the title and the colorbar with one row
        fig, ax = plt.subplots(figsize=(max(4.0, 1.8 + 0.9 * cols), max(2.6, 1.8 + 0.45 * rows)))
        im = ax.imshow(pivot.values, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(cols), pivot.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(rows), pivot.index, fontsize=8)
        for i in range(rows):
            for j in range(cols):
                v = pivot.values[i, j]
                if v == v:
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_title(f"DER (%){' with GIC' if gic else ''}, mean over attacks and seeds\n50 = no change, "
                     "100 = backdoor removed at no C-Acc cost", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="DER (%)")
        fig.tight_layout()
        target = out / f"der_heatmap{'_gic' if gic else ''}.png"
        written.append(atomic_write_with(target, lambda p: fig.savefig(p, format="png", dpi=110)))
        plt.close(fig)
    defenses = sorted(df["defense_label"].unique())
    fig, axes = plt.subplots(1, len(defenses), figsize=(3.2 * len(defenses), 3.0), squeeze=False)
    aux_types = sorted(df["aux_type"].unique())
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(aux_types)}
    for ax, d in zip(axes[0], defenses):
        g = df[df["defense_label"] == d]
        for _, r in g.iterrows():
            ax.scatter(r["asr_after"] * 100, r["acc_after"] * 100, color=colors[r["aux_type"]],
                       marker="^" if r["gic"] else "o", s=18)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("ASR after (%)")
        ax.set_xlim(-2, 102)
    axes[0][0].set_ylabel("C-Acc after (%)")
    handles = [plt.Line2D([], [], color=colors[a], marker="o", linestyle="", label=a) for a in aux_types]
    handles += [plt.Line2D([], [], color="grey", marker="^", linestyle="", label="with GIC")]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=min(6, len(handles)), bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    written.append(atomic_write_with(out / "acc_vs_asr.png", lambda p: fig.savefig(p, format="png", dpi=110)))
    plt.close(fig)
    return written
