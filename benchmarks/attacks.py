"""Efficacy and cost of every attack: C-Acc, ASR, RA and wall time of each, against a clean model trained alike.

Trains a clean model and each attack (badnet, blended, sig, wanet, inputaware, lf) with the same victim and
schedule, reads each record's ``attack_df_summary.csv`` row ``last``, and writes a Markdown table (C-Acc, ASR, RA,
the C-Acc drop against the clean model, wall time, epochs, machine) to ``benchmarks/results/attacks.md``. Targets:
ASR >= 0.90 and C-Acc within 3 points of the clean model; a row that misses says which, and the notes under the
table give the evidence (the target class's own clean accuracy, ASR per epoch, the warp's size).

On a ``<ds>_split_<pct>_seed_<s>`` dataset every run is also measured on the split's reserved part (training images
the victim never saw) with the run's own trigger: attack settings are tuned on those numbers (``--tuning`` rows,
listed apart), never on the test set, and the chosen row moves to the main table with ``--choose``. The lf attack
is crafted against the prototype row's clean model when there is one. Rows are kept in ``attacks.json`` beside the
table, so a later run can redo or add single attacks:

    B="--dataset fashion-mnist_split_5_seed_0 --model smallcnn --width 16 --epochs 6 --threads 1 --bb_root bbgic_bench"
    python benchmarks/attacks.py --attacks prototype badnet blended sig $B          # clean model first
    python benchmarks/attacks.py --attacks wanet --set s=2 --tuning $B            # a tuning row "wanet s=2"
    python benchmarks/attacks.py --attacks --choose "wanet s=2" $B                # it becomes the wanet row
                                                                                  # (an earlier choice goes back)
    python benchmarks/attacks.py --refresh                                        # recompute the notes, redraw
"""
from __future__ import annotations

import argparse
import json
import re
import logging
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from backdoorbench_gic.analysis import command_line, describe_machine
from backdoorbench_gic.attacks import build_attack, run_attack, train_victim
from backdoorbench_gic.attacks.triggers import cross_grids
from backdoorbench_gic.data.datasets import is_split_name, open_dataset
from backdoorbench_gic.evaluation import evaluate, predict_logits
from backdoorbench_gic.models import build_model_for_state_dict
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.results import read_summary_last
from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text
from backdoorbench_gic.utils.logs import console_logging

ATTACKS = ("prototype", "badnet", "blended", "sig", "wanet", "inputaware", "lf")
DEFAULT_PRATIO = 0.1
TARGET = 0
ASR_TARGET = 0.90
ACC_GAP_TARGET = 0.03
BASE_KEYS = {"attack", "dataset", "model", "width", "epochs", "lr", "batch_size", "device", "random_seed", "pratio",
             "attack_target", "save_folder_name"}
RESULTS = Path(__file__).resolve().parent / "results" / "attacks.md"


def machine() -> str:
    """CPU model and threads, or the GPU, in a few words."""
    if torch.cuda.is_available():
        return f"{describe_machine()} (CUDA, bf16 autocast)"
    return describe_machine(torch_threads=True)


def screen(cfg: dict, n: int, bb_root: Path) -> tuple[str, dict]:
    """Train on n seeded-random training images and measure on the split's reserved part, every epoch: a tuning
    row that costs a fraction of a full run and never sees the test set."""
    cfg = {k: v for k, v in cfg.items() if k != "save_folder_name"}
    attack = build_attack(cfg)
    data = open_dataset(cfg["dataset"], bb_root=bb_root)
    train = data.train.subset(torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n])
    t0 = time.time()
    _, history = train_victim(attack, train, data.split("reserved"), bb_root=bb_root)
    last = history.rows[-1]
    over = " ".join(f"{k}={v}" for k, v in cfg.items() if k not in BASE_KEYS)
    over += f" lr={cfg['lr']:g}" if cfg["lr"] != 0.01 else ""
    key = f"{cfg['attack']} {over} screen {n}x{cfg['epochs']}".replace("  ", " ")
    return key, {"attack": cfg["attack"], "tuning": True, "screen": n, "epochs": cfg["epochs"], "dataset": cfg["dataset"],
                 "pratio": cfg["pratio"], "heldout_acc": last["test_acc"], "heldout_asr": last.get("test_asr"),
                 "heldout_asr_by_epoch": [round(float(r.get("test_asr", float("nan"))), 4) for r in history.rows],
                 "wall_s": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M"), "test_acc": None}


def logged_wall_time(record_dir: Path) -> float | None:
    """The seconds a finished run's log reports on its last line ("... (218.2s); wrote ..."), else None."""
    if not any((record_dir / f).is_file() for f in ("attack_result.pt", "clean_model.pth")):
        return None
    for log_file in sorted(record_dir.glob("*.log"), reverse=True):
        found = re.findall(r"\(([0-9.]+)s\); wrote", log_file.read_text())
        if found:
            return float(found[-1])
    return None


def victim(record_dir: Path, attack: str, dataset: str, model_name: str, bb_root: Path) -> torch.nn.Module:
    """The trained network of a record: the clean model for prototype, else the attack record's model."""
    if attack == "prototype":
        state = torch.load(record_dir / "clean_model.pth", map_location="cpu", weights_only=True)
        num_classes = len(open_dataset(dataset, bb_root=bb_root).test.labels.unique())
        model = build_model_for_state_dict(model_name, num_classes, state, dataset)
        model.net.load_state_dict(state)
        return model.eval()
    return load_attack_record(record_dir, bb_root).build_model()


def heldout(attack, record_dir: Path, bb_root: Path) -> dict:
    """C-Acc and ASR on the split's reserved part (training data the victim never saw), with the trained attack's
    own trigger: what tuning may look at, the test set being for reporting only."""
    cfg = attack.config
    model = victim(record_dir, attack.name, cfg.dataset, cfg.model, bb_root)
    reserved = open_dataset(cfg.dataset, cfg.dataset_path, bb_root).split("reserved")
    bd = attack.poison_test(reserved)[0] if attack.poisons else None
    m = evaluate(model, reserved, bd)
    return {"heldout_acc": m.acc, "heldout_asr": None if bd is None else m.asr}


def diagnose(record_dir: Path, attack: str, dataset: str, model_name: str, bb_root: Path) -> dict:
    """Evidence for the notes: the clean accuracy on the target class alone, the share of the target class's training
    images that carry the trigger, ASR per epoch, and (wanet) how far the warp moves pixels."""
    test = open_dataset(dataset, bb_root=bb_root).test
    out: dict = {}
    model = victim(record_dir, attack, dataset, model_name, bb_root)
    if attack != "prototype":
        rec = load_attack_record(record_dir, bb_root)
        in_class = int((rec.clean_train.labels == TARGET).sum())
        flagged = sum(1 for _, b, o in rec.bd_train_state.entries.values() if o == TARGET and b == TARGET)
        out["target_poisoned_share"] = flagged / max(in_class, 1)
    pred = predict_logits(model, test).argmax(1)
    in_target = test.labels == TARGET
    out["target_class_acc"] = float((pred[in_target] == TARGET).float().mean())
    out["other_classes_acc"] = float((pred[~in_target] == test.labels[~in_target]).float().mean())
    df = pd.read_csv(record_dir / "attack_df.csv", index_col=0)
    if "test_asr" in df:
        out["asr_by_epoch"] = [round(float(v), 4) for v in df["test_asr"]]
    out["acc_by_epoch"] = [round(float(v), 4) for v in df["test_acc"]]
    grids = record_dir / "wanet_grids.pt"
    if grids.is_file():
        g = torch.load(grids, weights_only=True)
        _, h, w, _ = g["grid"].shape
        px = torch.tensor([(w - 1) / 2, (h - 1) / 2])  # grid units -> pixels (align_corners=True)
        shift = (g["grid"] - g["identity_grid"]) * px
        norm = shift.norm(dim=-1)
        out["warp_mean_px"], out["warp_max_px"] = float(norm.mean()), float(norm.max())
        jitter = (cross_grids(g["grid"], 256, torch.Generator().manual_seed(0)) - g["grid"]) * px
        out["cross_jitter_mean_px"] = float(jitter.norm(dim=-1).mean())  # what noise mode adds on top of the warp
    return out


def verdict(attack: str, row: dict, clean_acc: float | None) -> str:
    """"ok", or what missed the targets."""
    if attack == "prototype":
        return "baseline"
    misses = []
    if row.get("test_asr") is None or not row["test_asr"] >= ASR_TARGET:
        misses.append(f"ASR {row['test_asr']:.3f} < {ASR_TARGET}")
    if clean_acc is not None and clean_acc - row["test_acc"] > ACC_GAP_TARGET:
        misses.append(f"C-Acc {100 * (clean_acc - row['test_acc']):.1f} points below clean")
    return "ok" if not misses else "MISS: " + "; ".join(misses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS),
                   help="prototype (clean) first for the C-Acc drop and the lf trigger; none: only redraw")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--epochs_for", nargs="*", default=[], metavar="ATTACK=N",
                   help="per-attack epoch counts, e.g. wanet=12 (the rest use --epochs)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="attack keys (e.g. s=2 cross_ratio=1); the row is named '<attack> KEY=VALUE ...'")
    p.add_argument("--pratio", type=float, default=DEFAULT_PRATIO,
                   help="other than 0.1, the rows are named '<attack> pratio <p>' beside the default ones")
    p.add_argument("--device", default="auto")
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bb_root", default=None, help="where records go (default: a folder under the system temp dir)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tuning", action="store_true",
                   help="mark the rows as tuning runs: listed apart, with their held-out (reserved-part) numbers")
    p.add_argument("--choose", nargs="*", default=[], metavar="ROW",
                   help="move tuning rows (by their names in attacks.json) into the main table: the setting chosen "
                        "on held-out data; its test numbers, logged but not looked at while tuning, are reported")
    p.add_argument("--screen", type=int, default=None, metavar="N",
                   help="a quick tuning row: train on N random training images of the split, measure on its reserved "
                        "part only (no record, no test set)")
    p.add_argument("--reuse", action="store_true",
                   help="a record that is already finished is not trained again: its row is rebuilt from it, with "
                        "the wall time its run log reports")
    p.add_argument("--refresh", action="store_true", help="train nothing: recompute the notes from the records, redraw")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console_logging(logging.INFO)
    bb_root = Path(args.bb_root or Path(tempfile.gettempdir()) / "bbgic_bench_attacks")
    per_attack = {k: int(v) for k, v in (item.split("=", 1) for item in args.epochs_for)}

    store = Path(args.out).with_suffix(".json")
    results = json.loads(store.read_text()) if store.is_file() else {}
    if args.refresh:
        for key, r in results.items():
            record_dir = Path(r.get("record_dir") or bb_root / "record" /
                              f"bench_{r.get('attack', key)}_{r['dataset']}_w{r['width']}_e{r['epochs']}")
            r.update(record_dir=str(record_dir),
                     **diagnose(record_dir, r.get("attack", key), r["dataset"], r["model"], bb_root))
        atomic_write_json(store, results)
    for key in args.choose:
        if key not in results:
            p.error(f"--choose: no row {key!r} in {store} (rows: {', '.join(results)})")
        for other, r in results.items():  # one row per attack in the main table: an earlier choice goes back
            same = (r.get("attack"), r.get("dataset"), r.get("model"), r.get("width")) == tuple(
                results[key].get(k) for k in ("attack", "dataset", "model", "width"))
            if other != key and same and r.get("chosen_from_tuning") and not r.get("tuning"):
                r["tuning"], r["chosen_from_tuning"] = True, False
        results[key]["tuning"] = False
        results[key]["chosen_from_tuning"] = True
    if args.choose:
        atomic_write_json(store, results)
    command = command_line(__file__, argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    tag = "".join(f"_{k}{v}" for k, v in overrides.items())
    for attack in [] if args.refresh else args.attacks:
        epochs = per_attack.get(attack, args.epochs)
        suffix = "" if args.pratio == DEFAULT_PRATIO or attack == "prototype" else f"_p{args.pratio:g}"
        cfg = {"attack": attack, "dataset": args.dataset, "model": args.model, "width": args.width, "epochs": epochs,
               "lr": args.lr, "batch_size": args.batch_size, "device": args.device, "random_seed": args.random_seed,
               "pratio": args.pratio, "attack_target": TARGET,
               "save_folder_name": f"bench_{attack}_{args.dataset}_{args.model}_w{args.width}_e{epochs}{suffix}{tag}",
               **({} if attack == "prototype" else overrides)}
        clean = results.get("prototype", {})
        if attack == "lf" and "surrogate_record" not in overrides and clean.get("record_dir") and \
                (clean["dataset"], clean["model"], clean["width"]) == (args.dataset, args.model, args.width):
            cfg["surrogate_record"] = Path(clean["record_dir"]).name  # crafted against the clean row's model
        obj = build_attack(cfg)
        if args.screen:
            key, row = screen(cfg, args.screen, bb_root)
            row.update(overrides=overrides, command=command, machine=machine(), torch=str(torch.__version__),
                       model=args.model, width=args.width, lr=args.lr, batch_size=args.batch_size)
            results = {**(json.loads(store.read_text()) if store.is_file() else {}), key: row}
            atomic_write_json(store, results)
            print(f"{key}: held-out C-Acc {row['heldout_acc']:.4f} ASR {row['heldout_asr']} ({row['wall_s']:.0f}s)",
                  flush=True)
            continue
        record_dir = bb_root / "record" / cfg["save_folder_name"]
        wall = logged_wall_time(record_dir) if args.reuse else None
        if wall is not None:
            obj.setup(bb_root).load_extras(record_dir)
        else:
            t0 = time.time()
            record_dir = run_attack(obj, bb_root=bb_root, overwrite=True)
            wall = time.time() - t0
        row = read_summary_last(record_dir / "attack_df_summary.csv")
        key = " ".join([attack] + ([f"pratio {args.pratio:g}"] if suffix else []) +
                       ([f"{k}={v}" for k, v in overrides.items()] if attack != "prototype" else []))
        extra = heldout(obj, record_dir, bb_root) if is_split_name(args.dataset) else {}
        results[key] = {"attack": attack, "pratio": args.pratio, "overrides": overrides if attack != "prototype" else {},
                        "test_acc": row["test_acc"], "test_asr": row.get("test_asr"), "test_ra": row.get("test_ra"),
                        "wall_s": wall, "epochs": epochs, "lr": args.lr, "batch_size": args.batch_size,
                        "dataset": args.dataset, "model": args.model, "width": args.width, "machine": machine(),
                        "torch": str(torch.__version__), "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                        "record_dir": str(bb_root / "record" / record_dir.name),  # as given: no machine path
                        "tuning": args.tuning, **extra,
                        **diagnose(record_dir, attack, args.dataset, args.model, bb_root)}
        # each finished attack is kept, so a later run can add or redo others; rows other runs wrote meanwhile stay
        results = {**(json.loads(store.read_text()) if store.is_file() else {}), key: results[key]}
        atomic_write_json(store, results)
        print(f"{key}: C-Acc {row['test_acc']:.4f} ASR {row.get('test_asr', float('nan')):.4f} "
              f"RA {row.get('test_ra', float('nan')):.4f} held-out {extra} ({wall:.0f}s, {epochs} epochs)", flush=True)

    text = render(results)
    atomic_write_text(args.out, text)
    print(text)
    print(f"wrote {args.out} (rows kept in {store.name}); records under {bb_root / 'record'}")
    return 0


def evidence_for(r: dict, verdict_text: str, clean: dict) -> list[str]:
    """The numbers behind a miss, with the one-line reason they point to."""
    out = []
    c = lambda k: "?" if clean.get(k) is None else f"{clean[k]:.3f}"  # noqa: E731
    if "C-Acc" in verdict_text and r.get("target_class_acc") is not None:
        out.append(f"clean accuracy on target class {TARGET} is {r['target_class_acc']:.3f} (clean model "
                   f"{c('target_class_acc')}), on the other classes {r['other_classes_acc']:.3f} (clean model "
                   f"{c('other_classes_acc')})")
        share = r.get("target_poisoned_share")
        if share is not None and share >= 0.999:
            out.append(f"pratio {r.get('pratio', DEFAULT_PRATIO):g} of the training set is every training image of the "
                       "target class, so the victim never sees a clean target-class image and learns the class as the "
                       "trigger; training longer only reinforces that, a lower pratio leaves clean target-class images")
    if "ASR" in verdict_text and r.get("asr_by_epoch"):
        out.append("ASR by epoch " + ", ".join(f"{a:.3f}" for a in r["asr_by_epoch"]))
        if r.get("warp_mean_px") is not None:
            out.append(f"the warp moves pixels by {r['warp_mean_px']:.2f} px on average ({r['warp_max_px']:.2f} px at "
                       f"most), less than the per-pixel jitter noise mode adds to it "
                       f"({r.get('cross_jitter_mean_px', float('nan')):.2f} px on average) on cross_ratio times as many "
                       "training images that keep their label, so within a few epochs the network cannot tell the "
                       "trigger from its label-keeping variants (a larger s separates them; see the tuning runs)")
    return out


def settings(r: dict) -> str:
    """The row's attack-specific keys that differ from the attack's defaults."""
    keys = [f"{k}={v}" for k, v in (r.get("overrides") or {}).items()]
    keys += [f"lr={r['lr']:g}"] if r.get("lr") not in (None, 0.01) else []
    return " ".join(keys) or "defaults"


def render(results: dict) -> str:
    """The Markdown table, clean model first, then the attacks in the usual order, then notes on every miss; the
    tuning runs (chosen on held-out training data, never on the test set) in a table of their own."""
    main = {k: r for k, r in results.items() if not r.get("tuning")}
    tuning = {k: r for k, r in results.items() if r.get("tuning")}
    clean_row = main.get("prototype", {})
    clean = clean_row.get("test_acc")
    order = [a for a in ATTACKS if a in main] + sorted(set(main) - set(ATTACKS))
    fmt = lambda v: "" if v is None or v != v else f"{v:.4f}"  # noqa: E731  (None / NaN -> blank)
    lines = [
        "# Attack benchmark",
        "",
        "Each attack, and a clean model (`prototype`) trained the same way: SGD momentum 0.9, wd 5e-4, batch 128, "
        "cosine schedule over the run, seed 0, pratio 0.1 all2one to target 0. Defaults: badnet 3x3 square, blended "
        "alpha 0.2, sig delta 40 f 6 clean-label, wanet k 4 cross_ratio 2 with random crop 5 and rotation 10, "
        "inputaware cross_ratio 1 lambda_div 1 mask_density 0.032, lf eps 0.03 cutoff 3; the `settings` column lists "
        "what a row changed. Targets: ASR >= 0.90 and C-Acc within 3 points of the clean model. Wall times are the "
        "whole run (poisoning, training, evaluation every epoch, writing the record) with one torch thread on a shared "
        "2-core machine.",
        "",
        "| attack | settings | dataset | model | C-Acc | ASR | RA | C-Acc drop vs clean | target-class C-Acc | "
        "epochs | wall time (s) | machine | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for key in order:
        r = main[key]
        attack = r.get("attack", key)
        drop = "" if clean is None or attack == "prototype" else f"{100 * (clean - r['test_acc']):+.1f} pts"
        v = verdict(attack, r, clean)
        lines.append(f"| {attack} | {settings(r)} | {r['dataset']} | {r['model']} w{r['width']} | {fmt(r['test_acc'])} | "
                     f"{fmt(r.get('test_asr'))} | {fmt(r.get('test_ra'))} | {drop} | "
                     f"{fmt(r.get('target_class_acc'))} | "
                     f"{r['epochs']} | {r['wall_s']:.0f} | {r['machine']} | {v} |")
        if v.startswith("MISS"):
            notes.append(f"- **{key}** ({v[6:]}): " + "; ".join(evidence_for(r, v, clean_row)) + ".")
    if notes:
        lines += ["", "Why the misses happen (numbers read back from the records):", ""] + notes
    if tuning:
        held_clean = clean_row.get("heldout_acc")
        lines += ["", "## Tuning runs", "",
                  "Chosen on the split's reserved part (3,000 training images the victim never saw, triggered with the "
                  "run's own trigger), never on the test set. Clean model on that part: "
                  f"{fmt(held_clean) or '?'}.", "",
                  "| attack | settings | training images | epochs | held-out C-Acc | held-out ASR | mean warp (px) | "
                  "wall time (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in sorted(tuning, key=lambda k: (tuning[k].get("attack", k), tuning[k]["date"])):
            r = tuning[key]
            lines.append(f"| {r.get('attack', key)} | {settings(r)} | {r.get('screen') or 'all'} | {r['epochs']} | "
                         f"{fmt(r.get('heldout_acc'))} | "
                         f"{fmt(r.get('heldout_asr'))} | {fmt(r.get('warp_mean_px'))} | {r['wall_s']:.0f} |")
    lines += ["", "Commands and dates:", ""]
    lines += [f"- {k}: `{results[k]['command']}` ({results[k]['date']}, torch {results[k]['torch']})"
              for k in order + sorted(tuning)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
