"""Issue 23: configure each base defense for the MNIST domain on held-out data, before any GIC cell runs.

For every candidate of ``benchmarks/gic23/tune.yaml`` and every victim: draw the auxiliary set (``reserved`` at
the yaml's ratio and tuning seed), purify, and score on :func:`backdoorbench_gic.evaluation.heldout_sets` (the
split's other reserved images and the same images with the victim's own trigger); the test set is never read. Rows
are appended to the yaml's ``output`` CSV as they finish, so a rerun continues. The report names, per defense, the
candidate that succeeds on the most victims (ties: the higher mean DER) and writes
``benchmarks/results/gic23_tune.{md,json}``.

    python benchmarks/gic23_tune.py [--defenses ft sau] [--report_only]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from backdoorbench_gic.analysis import command_line, describe_machine, frame_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def load_grid(path: Path) -> dict:
    grid = yaml.safe_load(path.read_text())
    for key in ("bb_root", "output"):
        grid[key] = (path.parent / grid[key]).resolve()
    return grid


def run(grid: dict, defenses: list[str]) -> None:
    import torch

    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.data.transforms import TrainAugment
    from backdoorbench_gic.evaluation import compare, evaluate, heldout_sets
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.registry import DEFENSES
    from backdoorbench_gic.utils.io import atomic_write_text

    out: Path = grid["output"]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["victim", "defense", "candidate"])
    seen = {(r.victim, r.defense, int(r.candidate)) for r in done.itertuples()}
    device = torch.device("cpu")
    for victim_name in grid["victims"]:
        record = load_attack_record(grid["bb_root"] / "record" / victim_name, grid["bb_root"])
        aux = build_aux_set(record, grid["aux"], ratio=grid["ratio"], seed=grid["seed"])
        clean, bd = heldout_sets(record, exclude=aux.indices)
        victim = record.build_model().eval()
        before = evaluate(victim, clean, bd)
        for name in defenses:
            for i, overrides in enumerate(grid["candidates"][name]):
                if (victim_name, name, i) in seen:
                    continue
                keys = {**grid["defaults"], **overrides, "random_seed": grid["seed"]}
                defense = DEFENSES.get(name).from_sources(record.clean_data, None, keys, name=name)
                t0 = time.perf_counter()
                result = defense.purify(victim, aux, device=device, train_augment=TrainAugment.for_spec(record.spec),
                                        progress=False)
                seconds = time.perf_counter() - t0
                row = {"victim": victim_name, "defense": name, "candidate": i, "overrides": json.dumps(overrides),
                       "n_aux": len(aux), "n_clean": len(clean), "n_bd": len(bd), "seconds": round(seconds, 1),
                       **compare(before, evaluate(result.model, clean, bd))}
                frame = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                atomic_write_text(out, frame.to_csv(index=False))
                done = frame
                print(f"{victim_name} {name} #{i} {overrides}: C-Acc {row['acc_before']:.3f} -> {row['acc_after']:.3f}"
                      f", ASR {row['asr_before']:.3f} -> {row['asr_after']:.3f}, DER {row['der']:.3f} "
                      f"({seconds:.0f} s)", flush=True)


def choose(rows: pd.DataFrame) -> pd.DataFrame:
    """Per defense and candidate: victims succeeded, mean held-out figures; the chosen one first per defense."""
    rows = rows.assign(drop=rows.acc_before - rows.acc_after)
    table = (rows.groupby(["defense", "candidate", "overrides"])
             .agg(victims=("victim", "nunique"), successes=("success", "sum"), der=("der", "mean"),
                  acc_drop=("drop", "mean"), asr_after=("asr_after", "mean"), seconds=("seconds", "mean"))
             .reset_index()
             .sort_values(["defense", "successes", "der"], ascending=[True, False, False]))
    table["chosen"] = ~table.duplicated("defense")
    return table


def report(rows: pd.DataFrame, grid_path: Path, command: str) -> tuple[str, dict]:
    table = choose(rows)
    per_victim = rows.pivot_table(index=["defense", "candidate"], columns="victim",
                                  values=["acc_after", "asr_after"], aggfunc="first")
    per_victim.columns = [f"{v} {m.replace('_after', '')}" for m, v in per_victim.columns]
    victims = rows.drop_duplicates("victim")[["victim", "acc_before", "asr_before", "n_clean", "n_bd"]]
    lines = [f"`{command}` ({dt.datetime.now():%Y-%m-%d %H:%M}; {describe_machine()}). Candidates and protocol: "
             f"`benchmarks/{grid_path.relative_to(HERE).as_posix()}`. Held-out numbers only (the split's reserved "
             "images outside the tuning draw, and the same images with each victim's trigger); the test set is "
             "never read. Success: ASR <= 10 % and a C-Acc drop of at most 5 points.", "",
             "Victims on the held-out images:", "",
             frame_table(victims, {"acc_before": 4, "asr_before": 4}), "",
             "Candidates (mean over victims; `successes` counts victims):", "",
             frame_table(table, {"der": 3, "acc_drop": 4, "asr_after": 4, "seconds": 1}), "",
             "Per victim (held-out C-Acc and ASR after purification):", "",
             frame_table(per_victim.reset_index(), {c: 3 for c in per_victim.columns}), ""]
    chosen = {r.defense: {"overrides": json.loads(r.overrides), "successes": int(r.successes),
                          "victims": int(r.victims), "der": r.der}
              for r in table[table.chosen].itertuples()}
    return "\n".join(lines), chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(HERE / "gic23" / "tune.yaml"))
    p.add_argument("--defenses", nargs="*", default=None, help="default: every defense of the grid")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    grid_path = Path(args.grid).resolve()
    grid = load_grid(grid_path)
    if not args.report_only:
        run(grid, args.defenses or list(grid["candidates"]))
    rows = pd.read_csv(grid["output"])
    text, chosen = report(rows, grid_path, command_line(__file__, argv))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gic23_tune.md").write_text(text)
    (RESULTS / "gic23_tune.json").write_text(json.dumps(chosen, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
