"""How the demo's defense settings were chosen: on held-out data, never on the test set.

Runs the demo's purifications (``bbgic demo``'s victim, defense, auxiliary sets, with and without GIC) with the
settings given here, and measures each purified model on the reserved images its defense did not get: C-Acc on
them, ASR on them with the victim's trigger stamped on (``backdoorbench_gic.demo.heldout_check``). A row is a
success by the README's rule (ASR <= 10 %, C-Acc at most 5 points below the victim's, both on the held-out
images). Every trial is appended to ``benchmarks/results/demo_settings.json`` and the table
``benchmarks/results/demo_settings.md`` is rewritten from it; the settings the demo ships are one of these rows.

    python benchmarks/demo_settings.py --defense fst --set epochs=20                 # one trial
    python benchmarks/demo_settings.py --defense ft --set epochs=60 --set lr=0.05    # the earlier demo's FT
    python benchmarks/demo_settings.py --report_only                                 # redraw the table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--bb_root", default="bbgic_bench/demo_settings", help="where the split and the victim live")
    p.add_argument("--device", default="auto")
    p.add_argument("--defense", default=None, help="the defense (default: the demo preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a defense config key (repeatable); replaces the preset's keys when any is given")
    p.add_argument("--no_gic", action="store_true", help="skip the GIC rows")
    p.add_argument("--label", default=None, help="the trial's name in the table (default: defense and keys)")
    p.add_argument("--report_only", action="store_true", help="only rewrite the table from the JSON")
    p.add_argument("--out", default=str(RESULTS), help="folder of demo_settings.json / .md")
    return p.parse_args(argv)


def render(trials: list[dict]) -> str:
    lines = ["# Demo settings, measured on held-out reserved images (never the test set)", "",
             "Written by `python benchmarks/demo_settings.py` (see its docstring). C-Acc and ASR in % on the reserved "
             "images the defense did not get (ASR: those of a non-target class, with the victim's trigger); success: "
             "ASR <= 10 and C-Acc at most 5 points below the victim's. s: the defense's seconds (GIC's fit included)."]
    for t in trials:
        lines += ["", f"## {t['label']}", "", f"`{t['command']}`, {t['when']}, {t['machine']}, {t['wall_seconds']:.0f} s "
                  f"in all; preset {t['preset']}", "",
                  "| defense | aux | n | held-out n (bd) | victim C-Acc / ASR | C-Acc | ASR | success | GIC | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(
                f"| {r['defense']} | {r['aux_type']} | {r['aux_size']} | {r['heldout_n_clean']} ({r['heldout_n_bd']}) | "
                f"{100 * r['acc_before']:.1f} / {100 * r['asr_before']:.1f} | {100 * r['acc_after']:.1f} | "
                f"{100 * r['asr_after']:.1f} | {'yes' if r['success'] else 'no'} | {r['gic'] or '-'} | "
                f"{r['defense_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from backdoorbench_gic.analysis import command_line, describe_machine
    from backdoorbench_gic.config import parse_key_values
    from backdoorbench_gic.demo import DEFAULT_PRESET, PRESETS, heldout_check
    from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    args = parse_args(argv)
    out = Path(args.out)
    store = out / "demo_settings.json"
    trials = json.loads(store.read_text()) if store.is_file() else []
    if not args.report_only:
        console_logging(logging.WARNING)  # the pipeline logs test metrics at INFO: a choice must not see them
        preset = PRESETS.get(args.dataset, DEFAULT_PRESET)
        keys = parse_key_values(args.set, "--set") if args.set else dict(preset.defense_keys)
        preset = dataclasses.replace(preset, defense=args.defense or preset.defense, defense_keys=keys)
        t0 = time.perf_counter()
        rows = heldout_check(args.dataset, args.bb_root, args.device, preset, gic=not args.no_gic)
        label = args.label or " ".join([preset.defense, *(f"{k}={v}" for k, v in keys.items())])
        trials.append({"label": label, "when": time.strftime("%Y-%m-%d %H:%M"), "machine": describe_machine(True),
                       "command": command_line(__file__, argv), "dataset": args.dataset,
                       "preset": dataclasses.asdict(preset), "wall_seconds": round(time.perf_counter() - t0, 1),
                       "rows": rows})
        atomic_write_json(store, trials)
        for r in rows:
            print(f"{r['defense']} on {r['aux_type']}: held-out C-Acc {r['acc_before']:.1%} -> {r['acc_after']:.1%}, "
                  f"ASR {r['asr_before']:.1%} -> {r['asr_after']:.1%}: {'success' if r['success'] else 'failure'}")
    atomic_write_text(out / "demo_settings.md", render(trials))
    print(f"wrote {store} and {out / 'demo_settings.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
