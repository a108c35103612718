"""Why does GIC raise fine-tuning's ASR? Tests one explanation on a finished efficacy run: calibrated data is
*easier* for the victim (that is what BatchNorm alignment optimises), so fine-tuning on it starts from a lower
loss, moves the weights less, and leaves more of the backdoor in place. Shifted data does the opposite: it costs
clean accuracy but drags the weights further and removes more of the backdoor.

For every cell of the run (default: the 5 % efficacy block) it reads the purified model (defense_result.pt, loaded
through the safe loader) and the victim's weights, and reports

- ``drift``: ||theta_after - theta_victim|| / ||theta_victim|| over the trained parameters (BN running statistics
  excluded), from the same update vector the cosine below uses;
- ``loss0``: the base defense's mean training loss in its first epoch (from ``<defense>_df.csv``), i.e. how
  unfamiliar the (calibrated) auxiliary set is to the victim;

- ``bn_shift``: the mean symmetric KL between the victim's and the purified model's BatchNorm running statistics;
- ``update cos``: the cosine between the calibrated and the uncalibrated run's weight updates of one pair, beside
  the cosine between a shifted set's update and reserved's (how far a shift alone turns the update);
- ``toward reserved``: whether calibration turns a shifted set's update back to where in-distribution data lands
  (the projection of the calibrated-minus-uncalibrated update onto reserved-minus-uncalibrated, as a fraction), and
  how that fraction ranks against the paired ASR change, beside the same fraction towards train's update and, as the
  control, towards the other reserved_<shift> sets' updates. If GIC's ASR rise is in-distribution fine-tuning's
  weaker removal coming back, the fractions towards reserved and train exceed the control and rise with the ASR
  change;

then the paired GIC - uncalibrated differences per (victim, auxiliary type, seed) and Spearman rank correlations
of drift with ASR. Nothing here sees training data or tunes anything.

    python benchmarks/ft_drift.py [--spec benchmarks/efficacy_5pct.yaml]
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pandas as pd
import torch

from backdoorbench_gic.analysis import IN_DISTRIBUTION, Victims, finished_cells, frame_table, spearman

HERE = Path(__file__).resolve().parent


def _trained_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]


def update_vector(after: dict, before: dict) -> torch.Tensor:
    """The purification's change of the trained parameters, as one vector over all layers."""
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in _trained_keys(before)])


def weight_norm(state: dict) -> float:
    return float(torch.cat([state[k].double().flatten() for k in _trained_keys(state)]).norm())


def bn_shift(after: dict, before: dict) -> float:
    """Mean over BatchNorm layers of the symmetric KL between the victim's and the purified model's running
    N(mean, var) per channel: how far fine-tuning in train mode moved the normalisation statistics."""
    from backdoorbench_gic.bnstats import symmetric_gaussian_kl

    layers = [k[: -len("running_mean")] for k in before if k.endswith("running_mean")]
    if not layers:
        return float("nan")
    kl = [float(symmetric_gaussian_kl(after[p + "running_mean"].double(), after[p + "running_var"].double(),
                                      before[p + "running_mean"].double(), before[p + "running_var"].double()).mean())
          for p in layers]
    return sum(kl) / len(kl)


def first_epoch_loss(cell_dir: Path) -> float:
    for csv in sorted(cell_dir.glob("*_df.csv")):
        df = pd.read_csv(csv)
        col = "train_epoch_loss_avg_over_batch"
        if col in df and len(df):
            return float(pd.to_numeric(df[col], errors="coerce").iloc[0])
    return float("nan")


def collect(output_root: Path, bb_root: Path) -> pd.DataFrame:
    victims = Victims(bb_root)
    rows, updates = [], {}
    for cell in finished_cells(output_root):
        row = {k: v for k, v in cell.row.items() if k != "cell_dir"}
        victim = victims.record(cell.attack).state_dict
        norm = victims.derived(cell.attack, "weight norm", lambda r: weight_norm(r.state_dict))
        purified = cell.purified_state()
        update = update_vector(purified, victim)
        rows.append({**row, "drift": float(update.double().norm()) / norm,
                     "bn_shift": bn_shift(purified, victim), "loss0": first_epoch_loss(cell.cell_dir)})
        updates[cell.pair_key, cell.gic] = update
    if not rows:
        raise SystemExit(f"no finished cells under {output_root}/cells: run the efficacy spec first")
    df = pd.DataFrame(rows)
    # direction: cosine between the calibrated and the uncalibrated run's weight updates of one pair
    cos = {pair: float(torch.nn.functional.cosine_similarity(u, updates[pair, False], dim=0))
           for (pair, gic), u in updates.items() if gic and (pair, False) in updates}
    df["update_cos"] = [cos.get((r.attack, r.base_defense, r.aux_type, r.seed), float("nan")) if r.gic else float("nan")
                        for r in df.itertuples()]
    # reference: how far a shift alone turns the update, uncalibrated S against uncalibrated reserved
    ref = {pair: float(torch.nn.functional.cosine_similarity(u, updates[(pair[0], pair[1], "reserved", pair[3]), False],
                                                             dim=0))
           for (pair, gic), u in updates.items()
           if not gic and pair[2] != "reserved" and ((pair[0], pair[1], "reserved", pair[3]), False) in updates}
    df["shift_cos"] = [ref.get((r.attack, r.base_defense, r.aux_type, r.seed), float("nan")) if not r.gic else float("nan")
                       for r in df.itertuples()]
    # toward in-distribution: does calibration turn a shifted set's update back to where in-distribution data lands
    # (reserved, and train where the run has it), more than towards another transformation of the same reserved images
    # (the control: every projection onto (u_T - u_S) shares u_S's own run-to-run noise, which biases it above 0
    # whatever T is; inversion and mix are left out of it, their updates lie much further away or contain reserved)?
    measures: dict[str, dict] = {"toward_reserved": {}, "toward_train": {}, "toward_other_shift": {}, "gic_reserved_cos": {}}
    for (pair, gic), u in updates.items():
        if not gic or pair[2] in IN_DISTRIBUTION or (pair, False) not in updates:
            continue
        plain = updates[pair, False]
        in_dist = {t: updates.get(((pair[0], pair[1], t, pair[3]), False)) for t in IN_DISTRIBUTION}
        if in_dist["reserved"] is not None:
            measures["toward_reserved"][pair], measures["gic_reserved_cos"][pair] = toward(plain, u, in_dist["reserved"])
        if in_dist["train"] is not None:
            measures["toward_train"][pair] = toward(plain, u, in_dist["train"])[0]
        others = [toward(plain, u, v)[0] for (q, g), v in updates.items()
                  if not g and q[:2] == pair[:2] and q[3] == pair[3] and q[2] != pair[2] and q[2].startswith("reserved_")]
        if others:
            measures["toward_other_shift"][pair] = sum(others) / len(others)
    for col, values in measures.items():
        df[col] = [values.get((r.attack, r.base_defense, r.aux_type, r.seed), float("nan")) if r.gic else float("nan")
                   for r in df.itertuples()]
    return df


def toward(plain: torch.Tensor, calibrated: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """How far calibration moves a shifted set's update towards another run's update (same victim and seed): the
    projection of (calibrated - plain) onto (target - plain), as a fraction of that distance (0: not at all, 1: all
    the way, < 0: away), and the cosine of the calibrated update with the target's."""
    gap = (target - plain).double()
    frac = float(torch.dot((calibrated - plain).double(), gap) / gap.dot(gap).clamp_min(1e-30))
    return frac, float(torch.nn.functional.cosine_similarity(calibrated.double(), target.double(), dim=0))


def _toward_vs_dasr(paired_group: pd.DataFrame, df: pd.DataFrame, attack: str, defense: str):
    """The shifted pairs' toward-reserved fraction and their paired ASR change, aligned by (aux type, seed)."""
    g = paired_group[paired_group["aux_type"] != "reserved"].set_index(["aux_type", "seed"])
    t = df[df["gic"] & (df["attack"] == attack) & (df["base_defense"] == defense)].set_index(["aux_type", "seed"])
    both = g[["asr_after"]].join(t[["toward_reserved"]], how="inner").dropna()
    return both["toward_reserved"], both["asr_after"]


def report(df: pd.DataFrame, spec_name: str) -> str:
    pct = {"acc_after": 100, "asr_after": 100}
    for col, f in pct.items():
        df[col] = df[col] * f
    out = [f"## Why GIC raises fine-tuning's ASR: weight drift\n\nEfficacy spec `{spec_name}`; "
           f"{dt.datetime.now():%Y-%m-%d %H:%M}; `python benchmarks/ft_drift.py`. drift = relative L2 distance of the "
           "purified weights from the victim's; loss0 = the base defense's mean training loss in its first epoch.\n"]
    means = (df.groupby(["attack", "base_defense", "aux_type", "gic"])[["loss0", "drift", "bn_shift", "acc_after",
                                                                        "asr_after"]].mean().reset_index())
    out += ["Means over seeds:\n", frame_table(means, {"loss0": 3, "drift": 4, "bn_shift": 4, "acc_after": 2,
                                                      "asr_after": 2}),
            ""]
    key = ["attack", "base_defense", "aux_type", "seed"]
    cols = ["loss0", "drift", "bn_shift", "acc_after", "asr_after"]
    plain = df[~df["gic"]].set_index(key)[cols]
    calib = df[df["gic"]].set_index(key)[cols]
    paired = (calib - plain).dropna().reset_index()
    pair_cos = df[df["gic"]].groupby(["attack", "base_defense"])["update_cos"].mean().to_dict()
    shift_cos = df[~df["gic"]].groupby(["attack", "base_defense"])["shift_cos"].mean().to_dict()
    res_cos = df[df["gic"]].groupby(["attack", "base_defense"])["gic_reserved_cos"].mean().to_dict()
    toward_means = {c: df[df["gic"]].groupby(["attack", "base_defense"])[c].mean().to_dict()
                    for c in ("toward_reserved", "toward_train", "toward_other_shift")}
    if len(paired):
        summary = []
        for (attack, defense), g in paired.groupby(["attack", "base_defense"]):
            summary.append({"attack": attack, "defense": defense, "pairs": len(g),
                            "d_loss0": g["loss0"].mean(), "d_drift": g["drift"].mean(),
                            "drift lower with GIC": f"{int((g['drift'] < 0).sum())}/{len(g)}",
                            "d_bn_shift": g["bn_shift"].mean(),
                            "bn_shift lower with GIC": f"{int((g['bn_shift'] < 0).sum())}/{len(g)}",
                            "update cos": float(pair_cos.get((attack, defense), float("nan"))),
                            "shift-vs-reserved cos": float(shift_cos.get((attack, defense), float("nan"))),
                            "d_asr": g["asr_after"].mean(), "d_acc": g["acc_after"].mean(),
                            "cos(S+GIC, reserved)": float(res_cos.get((attack, defense), float("nan"))),
                            "toward reserved": float(toward_means["toward_reserved"].get((attack, defense), float("nan"))),
                            "toward train": float(toward_means["toward_train"].get((attack, defense), float("nan"))),
                            "toward other shifts": float(toward_means["toward_other_shift"].get((attack, defense), float("nan"))),
                            "rho(toward, d_asr)": spearman(*_toward_vs_dasr(g, df, attack, defense)),
                            "rho(d_drift, d_asr)": spearman(g["drift"], g["asr_after"]),
                            "rho(d_bn_shift, d_asr)": spearman(g["bn_shift"], g["asr_after"])})
        out += ["Paired differences (GIC - uncalibrated), per victim and base defense:\n",
                frame_table(pd.DataFrame(summary), {"d_loss0": 3, "d_drift": 4, "d_bn_shift": 4, "update cos": 3,
                                                    "shift-vs-reserved cos": 3, "d_asr": 2, "d_acc": 2,
                                                    "cos(S+GIC, reserved)": 3, "toward reserved": 3,
                                                    "toward train": 3, "toward other shifts": 3,
                                                    "rho(toward, d_asr)": 2, "rho(d_drift, d_asr)": 2,
                                                    "rho(d_bn_shift, d_asr)": 2}), "",
                "`shift-vs-reserved cos`: cosine of a shifted set's uncalibrated update with reserved's (same victim and "
                "seed); `cos(S+GIC, reserved)`: the same for the calibrated update; `toward reserved`: the projection of "
                "(calibrated - uncalibrated update) onto (reserved - uncalibrated update), as a fraction of that distance "
                "(0: calibration leaves the update where the shift put it, 1: moves it all the way to where in-distribution "
                "data lands); `toward train`: the same towards train's update; `toward other shifts`: the control, the mean of "
                "the same fraction towards each other reserved_<shift> set's update (every such projection shares the uncalibrated "
                "run's own noise, so it sits above 0 even for an unrelated target); `rho(toward, d_asr)`: the rank "
                "correlation of `toward reserved` with the paired ASR change over shifted pairs.", ""]
    corr = []
    for (attack, defense), g in df.groupby(["attack", "base_defense"]):
        corr.append({"attack": attack, "defense": defense, "cells": len(g),
                     "rho(drift, asr)": spearman(g["drift"], g["asr_after"]),
                     "rho(bn_shift, asr)": spearman(g["bn_shift"], g["asr_after"]),
                     "rho(loss0, drift)": spearman(g["loss0"], g["drift"]),
                     "rho(drift, acc)": spearman(g["drift"], g["acc_after"])})
    out += ["Spearman rank correlations over all cells (calibrated and not):\n",
            frame_table(pd.DataFrame(corr), {c: 2 for c in ("rho(drift, asr)", "rho(bn_shift, asr)",
                                                                 "rho(loss0, drift)", "rho(drift, acc)")}), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "efficacy_5pct.yaml"))
    p.add_argument("--out", default=None, help="default: benchmarks/results/ft_drift_<spec name>.md")
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import load_spec
    from backdoorbench_gic.utils.io import atomic_write_text

    spec = load_spec(args.spec)
    df = collect(Path(spec.output_root), Path(spec.bb_root))
    text = report(df, Path(args.spec).name)
    out = Path(args.out) if args.out else HERE / "results" / f"ft_drift_{spec.name}.md"
    atomic_write_text(out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
