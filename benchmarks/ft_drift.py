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

then the paired GIC - uncalibrated differences per (victim, auxiliary type, seed) and Spearman rank correlations
of drift with ASR. Nothing here sees training data or tunes anything.

    python benchmarks/ft_drift.py [--spec benchmarks/efficacy_5pct.yaml]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from efficacy import md_table  # noqa: E402


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


def frame_table(df: pd.DataFrame, floatfmt: dict[str, int]) -> str:
    rows = [[(f"{v:.{floatfmt[c]}f}" if c in floatfmt and isinstance(v, float) else v) for c, v in r.items()]
            for r in df.to_dict("records")]
    return md_table(list(df.columns), rows)


def spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank())) if len(a) > 2 else float("nan")


def collect(output_root: Path, bb_root: Path) -> pd.DataFrame:
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.results import load_defense_result

    victims: dict[str, dict] = {}
    norms: dict[str, float] = {}
    rows, updates = [], {}
    for result in sorted((output_root / "cells").rglob("result.json")):
        row = json.loads(result.read_text())
        cell_dir = result.parent
        if row["attack"] not in victims:
            victims[row["attack"]] = load_attack_record(row["attack"], bb_root).state_dict
            norms[row["attack"]] = weight_norm(victims[row["attack"]])
        victim = victims[row["attack"]]
        purified = load_defense_result(cell_dir / "defense_result.pt")["model"]
        update = update_vector(purified, victim)
        rows.append({**row, "drift": float(update.double().norm()) / norms[row["attack"]],
                     "bn_shift": bn_shift(purified, victim), "loss0": first_epoch_loss(cell_dir)})
        pair = (row["attack"], row.get("base_defense", row["defense"]), row["aux_type"], row["seed"])
        updates[pair, bool(row.get("gic", False))] = update
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
    return df


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
                            "rho(d_drift, d_asr)": spearman(g["drift"], g["asr_after"]),
                            "rho(d_bn_shift, d_asr)": spearman(g["bn_shift"], g["asr_after"])})
        out += ["Paired differences (GIC - uncalibrated), per victim and base defense:\n",
                frame_table(pd.DataFrame(summary), {"d_loss0": 3, "d_drift": 4, "d_bn_shift": 4, "update cos": 3, "shift-vs-reserved cos": 3, "d_asr": 2, "d_acc": 2,
                                                           "rho(d_drift, d_asr)": 2, "rho(d_bn_shift, d_asr)": 2}), ""]
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
