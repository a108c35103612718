"""Issue 24, part (b): is the removal that shifted or external auxiliary data makes superficial, and does GIC's
calibrated purification leave less backdoor once the model is probed? Probes the purified models the issue-23 blocks
stored (``benchmarks/gic23/``: development and confirmation, uncalibrated, the packaged default and the generator
variant; the 5 % size), read-only and without running any defense again (``probes.probe_finished_cells``), with the
MNIST probe settings fixed before any comparison (``benchmarks/probes24/all_reserved.yaml``'s ``probe_options``,
chosen on the victims and the clean control only: ``benchmarks/probe_defaults.py``). SAU's cells were never run for
issue 23; ``benchmarks/probes24/sau_gic23_blended.yaml`` runs them on Blended with the probes, and they are read
as stored and reported apart.

    python benchmarks/probes24_gic.py            # probe what is not probed yet (resumable), then report
    python benchmarks/probes24_gic.py --report_only

Outputs: benchmarks/results/probes24_gic23.md and .json; the probed rows under <bb_root>/runs/probes24-<part>/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import Col, command_line, describe_machine, md_table
from backdoorbench_gic.analysis.compare import IN_DISTRIBUTION
from backdoorbench_gic.matrix import collect_results, load_spec
from backdoorbench_gic.matrix.study import study_blocks

HERE = Path(__file__).resolve().parent
BLOCK_FILES = ("dev.yaml", "dev_generator64.yaml", "confirm.yaml")
# blocks whose cells ran with the probes (benchmarks/probes24/sau_gic23_blended.yaml: SAU, Blended), read as stored
INLINE_FILES = ("dev_sau.yaml",)
SETTINGS_SPEC = HERE / "probes24" / "all_reserved.yaml"
SIZE = "r0.05"
PROBES = ("refresh", "retune")
SHOWN = [Col.ASR_AFTER, Col.ASR_REFRESH_AFTER, Col.P_ASR_AFTER, Col.ACC_AFTER]


def parts(blocks) -> dict[str, object]:
    """Every stored part of the blocks: ``{label: spec}`` for the uncalibrated cells and each calibrated variant."""
    out = {}
    for name, block in blocks.items():
        out[f"{name}/off"] = block.spec
        for label, part in block.variants.items():
            out[f"{name}/{'default' if part.output_root == block.spec.output_root else label}"] = part
    return out


def probed_root(spec) -> Path:
    return Path(spec.bb_root) / "runs" / f"probes24-{Path(spec.output_root).name}"


def frame(label: str, probed: pd.DataFrame) -> pd.DataFrame:
    """The part ``label``'s rows at the 5 % size from its folder's probed rows (uncalibrated and default cells
    share a folder), tagged with their block and variant."""
    if probed.empty:
        return probed
    gic = probed[Col.GIC].astype(bool)
    keep = gic if not label.endswith("/off") else ~gic
    return probed[keep & (probed[Col.AUX_SIZE_LABEL] == SIZE)].assign(block=label.split("/")[0],
                                                                      variant=label.split("/")[1])


def table(df: pd.DataFrame) -> tuple[str, list[dict]]:
    """Mean ASR, ASR-refresh, P-ASR and C-Acc (%) per block, base defense, set and variant."""
    g = df.groupby(["block", Col.BASE_DEFENSE, Col.AUX_TYPE, "variant"], sort=True)
    means = g[SHOWN].mean() * 100
    n = g.size()
    rows, out = [], []
    for key, r in means.iterrows():
        rows.append(list(key) + [int(n[key])] + [f"{r[c]:.1f}" for c in SHOWN])
        out.append(dict(zip(["block", "base_defense", "aux_type", "variant"], key), runs=int(n[key]),
                        **{c: float(r[c]) for c in SHOWN}))
    return md_table(["block", "defense", "aux", "variant", "runs", "ASR", "ASR-refresh", "P-ASR", "C-Acc"], rows), out


def answers(df: pd.DataFrame) -> tuple[str, dict]:
    """The two questions over the uncalibrated and calibrated runs, pooled over defenses and seeds, for all victims
    and per victim: how much lower each backdoor measure is on the shifted sets than on ``reserved`` (the shift's
    extra removal, and whether it survives refresh and retuning), and the paired change each GIC variant makes to
    each measure on the shifted sets."""
    keys = ["block", Col.ATTACK, Col.BASE_DEFENSE, Col.AUX_TYPE, Col.SEED]
    rows, out = [], {}
    for victim in ["all victims"] + sorted(set(df[Col.ATTACK])):
        part = df if victim == "all victims" else df[df[Col.ATTACK] == victim]
        off = part[part.variant == "off"].set_index(keys)
        ref = off[off.index.get_level_values(Col.AUX_TYPE).isin(IN_DISTRIBUTION)].droplevel(Col.AUX_TYPE)
        shifted = off[~off.index.get_level_values(Col.AUX_TYPE).isin(IN_DISTRIBUTION)]
        against = ref[SHOWN].reindex(shifted.index.droplevel(Col.AUX_TYPE)).to_numpy()
        extra = dict(zip(SHOWN[:3], ((against - shifted[SHOWN].to_numpy()) * 100).mean(axis=0)[:3].tolist()))
        got = out.setdefault(victim, {"extra_removal_of_shift": extra, "gic_change_on_shifted": {}})
        rows.append([victim, "reserved minus shifted, uncalibrated (the shift's extra removal)", len(shifted)]
                    + [f"{extra[c]:+.1f}" for c in SHOWN[:3]])
        for v in sorted(set(part.variant) - {"off"}):
            on = part[part.variant == v].set_index(keys)
            both = shifted.merge(on[SHOWN], left_index=True, right_index=True, suffixes=("", "_gic"))
            change = {c: float(((both[f"{c}_gic"] - both[c]) * 100).mean()) for c in SHOWN}
            got["gic_change_on_shifted"][v] = {**change, "pairs": int(len(both))}
            rows.append([victim, f"GIC {v} minus uncalibrated, shifted sets", len(both)]
                        + [f"{change[c]:+.1f}" for c in SHOWN[:3]])
    return md_table(["victims", "difference (points)", "runs", "ASR", "ASR-refresh", "P-ASR"], rows), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from backdoorbench_gic.probes import probe_finished_cells
    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    options = load_spec(SETTINGS_SPEC).probe_options
    stored = parts(study_blocks([HERE / "gic23" / f for f in BLOCK_FILES]))
    folders = {spec.output_root: spec for spec in stored.values()}  # a block's off and default share one
    if not args.report_only:
        for root, spec in folders.items():
            print(f"probing {root}", flush=True)
            probe_finished_cells(root, spec.bb_root, probed_root(spec), PROBES, options,
                                 select=lambda row: row.get(Col.AUX_SIZE_LABEL) == SIZE)
    probed = {root: collect_results(probed_root(spec)) for root, spec in folders.items()}
    df = pd.concat([f for f in (frame(label, probed[spec.output_root]) for label, spec in stored.items())
                    if not f.empty], ignore_index=True)
    inline = parts(study_blocks([HERE / "gic23" / f for f in INLINE_FILES]))
    ran = {spec.output_root: collect_results(spec.output_root) for spec in inline.values()}
    sau = pd.concat([frame(label, ran[spec.output_root]) for label, spec in inline.items()], ignore_index=True)
    per, rows = table(pd.concat([df, sau], ignore_index=True))
    ans, figures = answers(df)
    sau_ans, sau_figures = answers(sau) if not sau.empty else ("(no SAU cells finished)", {})
    text = (f"## Probes on the issue-23 blocks (issue 24, part b)\n\nmachine: {describe_machine()}; command "
            f"`{command_line(__file__, argv)}`; {dt.datetime.now():%Y-%m-%d %H:%M}; probe settings "
            f"{json.dumps(options)} (`{SETTINGS_SPEC.relative_to(HERE.parent)}`); the 5 % size; test-set numbers in %\n\n"
            + ans + "\n\nSAU (`gic23/dev_sau.yaml`'s cells on Blended, run with the probes by "
            "`benchmarks/probes24/sau_gic23_blended.yaml`; reported apart, not pooled above):\n\n" + sau_ans
            + "\n\nPer block, base defense, set and variant (means over victims and seeds):\n\n" + per + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probes24_gic23.md", text)
    atomic_write_text(out / "probes24_gic23.json", json.dumps(
        {"generated": dt.datetime.now().isoformat(timespec="seconds"), "probe_options": options, **figures,
         "sau": sau_figures, "rows": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
