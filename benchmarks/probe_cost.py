"""What the post-purification probes cost a cell, and what they read on the victim and the clean control.

One defense on one record, three times, through the pipeline a matrix cell uses (``pipeline.run_defense``):

- ``plain``: no probes (the cell's wall time the target compares with);
- ``cold``: ``--probes refresh,retune`` with an empty probe cache: the victim's probes and the clean control (trained
  on the record's clean training data with the victim's schedule) are paid here, as by a record's first cell;
- ``warm``: the same again: the victim's and the control's results come from the cache, as in every later cell.

Each phase is one command (they run for minutes; separate commands let other jobs share the CPU) and adds its row to
``--out`` (JSON). The target (issue 24): probes must not more than double a cell's wall time at the 5 % size, i.e.
``warm`` wall <= 2 x ``plain`` wall; the ``cold`` row also shows the one-off cost of a record's control. The rows
carry the victim's P-ASR and the clean control's at the probes' defaults, the numbers the defaults were fixed on.

The stored result (``results/probe_cost_badnet_fm_w16.json``) is on the BadNets victim of ``defenses_5pct.yaml``
(made with those ``generate`` settings: Fashion-MNIST, PreActResNet-18 width 16, 4 epochs), FT at 5 %, one thread.

    python benchmarks/probe_cost.py --bb_root ../bbgic_bench --record badnet_fm_w16 --phase plain
    python benchmarks/probe_cost.py --bb_root ../bbgic_bench --record badnet_fm_w16 --phase cold
    python benchmarks/probe_cost.py --bb_root ../bbgic_bench --record badnet_fm_w16 --phase warm
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = ("attack", "model", "defense", "aux_type", "aux_size", "seed", "acc_before", "asr_before", "acc_after",
        "asr_after", "eval_n_clean", "eval_n_bd", "aux_seconds", "defense_seconds", "wall_seconds", "device")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bb_root", required=True, help="BackdoorBench root holding record/")
    p.add_argument("--record", required=True, help="record folder name under record/")
    p.add_argument("--phase", required=True, choices=("plain", "cold", "warm"))
    p.add_argument("--defense", default="ft")
    p.add_argument("--reserved_type", default="train")
    p.add_argument("--ratio", type=float, default=0.05, help="auxiliary share of the training set (the 5 %% size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=None, help="probe cache folder shared by cold and warm (default: a folder "
                                                 "under the system's temp dir, named after the record)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/probe_cost_<record>.json)")
    args = p.parse_args(argv)

    cache = Path(args.cache or Path(tempfile.gettempdir()) / f"bbgic_probe_cost_{args.record}")
    if args.phase == "cold" and cache.exists():
        import shutil

        shutil.rmtree(cache)  # cold: nothing of this record's probes may be cached
    os.environ["BBGIC_CACHE_DIR"] = str(cache / "gic")  # the probes' and the control's caches live beside it

    from backdoorbench_gic.analysis import command_line, describe_machine
    from backdoorbench_gic.keys import Col
    from backdoorbench_gic.pipeline import DefenseRequest, run_defense

    probes = [] if args.phase == "plain" else ["refresh", "retune"]
    with tempfile.TemporaryDirectory(prefix="bbgic-probe-cost-") as tmp:
        row = run_defense(DefenseRequest(
            result_file=args.record, defense=args.defense, bb_root=args.bb_root, device=args.device,
            overrides={"reserved_type": args.reserved_type, "ratio": args.ratio}, output_dir=tmp, monitor_every=0,
            progress=False, probes=probes))
    keep = {k: row[k] for k in KEEP if k in row}
    keep.update({k: v for k, v in row.items() if k.startswith(("asr_half", "asr_refresh", "acc_half", "acc_refresh",
                                                               "p_asr", "p_acc", "refresh_n", "half_n", "retune_n"))})
    keep.update({k: row.get(k) for k in (Col.PROBE_SECONDS, Col.CONTROL_SECONDS)})
    out = Path(args.out or HERE / "results" / f"probe_cost_{args.record}.json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    command = command_line(__file__).replace(args.bb_root, "<bb_root>")  # no machine paths in stored results
    if args.cache:
        command = command.replace(args.cache, "<cache>")
    data[args.phase] = {**keep, "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                        "machine": describe_machine(torch_threads=True), "command": command}
    if "plain" in data and "warm" in data:
        data["warm_over_plain"] = data["warm"]["wall_seconds"] / data["plain"]["wall_seconds"]
    if "plain" in data and "cold" in data:
        data["cold_over_plain"] = data["cold"]["wall_seconds"] / data["plain"]["wall_seconds"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(json.dumps(data[args.phase], indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
