"""The embedded demo (``bbgic demo``, or ``python run_defense.py`` with no arguments in a clone): a real backdoor
attack and its purification, on data that ships offline, in a few minutes on two CPU cores.

1. split the dataset BackdoorBenchER's way (``<ds>_split_<pct>_seed_0``: train / reserved / test);
2. train a BadNets victim on the train part (or reuse the record if a valid one is cached);
3. purify it with fine-tuning on (a) the reserved, in-distribution auxiliary set and (b) a shifted copy of it,
   each without and with Guided Input Calibration;
4. print one table: C-Acc, ASR, RA and DER per row, in percent, with a legend and a one-line reading.

Everything lands under ``--bb_root`` (default ``./bbgic_demo``) in BackdoorBench's layout, so the record can be
inspected (``bbgic inspect``) and purified again with any defense.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    split_pct: int
    model: str
    width: int
    attack_epochs: int
    attack_batch: int
    attack_lr: float
    aux_ratio: float  # share of the victim's training set given to the defense (BackdoorBenchER's rule)
    ft_epochs: int
    shift: str
    ft_lr: float = 0.01


PRESETS: dict[str, Preset] = {
    # 1,797 images: a 20 % reserved split leaves ~1,440 for the victim; the defense gets 20 % of that (~290)
    # FT at lr 0.01 leaves this BadNets victim at ASR ~0.75-0.78 after 20-60 epochs (measured): 0.05 purifies
    "digits": Preset(20, "preactresnet18", 16, 20, 32, 0.02, 0.2, 60, "reserved_noise", ft_lr=0.05),
    "mnist": Preset(5, "preactresnet18", 16, 2, 128, 0.01, 0.05, 10, "reserved_noise"),
    "fashion-mnist": Preset(5, "preactresnet18", 16, 3, 128, 0.01, 0.05, 10, "reserved_noise"),
}
DEFAULT_PRESET = Preset(5, "preactresnet18", 16, 3, 128, 0.01, 0.05, 10, "reserved_noise")


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def ensure_split(dataset: str, pct: int, bb_root: Path) -> str:
    from .auxdata import make_split
    from .data.specs import split_name

    name = split_name(dataset, pct, 0)
    make_split(dataset, pct / 100.0, 0, dataset_path="./data", bb_root=bb_root)
    return name


def ensure_victim(split: str, preset: Preset, bb_root: Path, record: str, device: str) -> Path:
    from .attacks import run_attack
    from .inspection import inspect_record

    record_dir = bb_root / "record" / record
    if (record_dir / "attack_result.pt").is_file():
        report = inspect_record(record_dir, bb_root)
        if report.valid:
            print(f"      reusing the cached victim {record_dir}", file=sys.stderr)
            return record_dir
        print(f"      the cached record is not valid ({'; '.join(report.problems)}); making it again", file=sys.stderr)
    cfg = {"attack": "badnet", "dataset": split, "model": preset.model, "width": preset.width,
           "epochs": preset.attack_epochs, "batch_size": preset.attack_batch, "lr": preset.attack_lr,
           "save_folder_name": record, "device": device, "random_seed": 0}
    return run_attack(cfg, bb_root=bb_root, overwrite=True)


def run_demo(dataset: str = "digits", bb_root: str | Path = "bbgic_demo", device: str = "auto", gic: bool = True,
             shift: str | None = None) -> list[dict[str, Any]]:
    from .evaluation import der
    from .pipeline import DefenseRequest, run_defense

    t0 = time.perf_counter()
    preset = PRESETS.get(dataset, DEFAULT_PRESET)
    shift = shift or preset.shift
    bb_root = Path(bb_root).resolve()
    bb_root.mkdir(parents=True, exist_ok=True)
    n = 4
    _stage(1, n, f"split {dataset} into train / reserved ({preset.split_pct} %) / test under {bb_root / 'data'}")
    split = ensure_split(dataset, preset.split_pct, bb_root)
    record = f"demo_{dataset}_badnet"
    _stage(2, n, f"BadNets victim ({preset.model}, width {preset.width}, {preset.attack_epochs} epochs) on {split}")
    ensure_victim(split, preset, bb_root, record, device)
    runs = [("ft", "reserved"), ("ft", shift)]
    if gic:
        runs += [("gic-ft", "reserved"), ("gic-ft", shift)]
    rows = []
    for i, (defense, aux) in enumerate(runs, start=1):
        _stage(3, n, f"purify ({i}/{len(runs)}): {defense} on {aux}")
        req = DefenseRequest(result_file=record, defense=defense, bb_root=str(bb_root), device=device,
                             overrides={"reserved_type": aux, "ratio": preset.aux_ratio, "epochs": preset.ft_epochs,
                                        "lr": preset.ft_lr},
                             monitor_every=0)
        rows.append(run_defense(req))
    _stage(4, n, f"done in {time.perf_counter() - t0:.0f} s")
    first = rows[0]
    table = [{"defense": "none (victim)", "aux": "-", "n": "-", "C-Acc": first["acc_before"],
              "ASR": first["asr_before"], "RA": first["ra_before"],
              "DER": der(first["acc_before"], first["asr_before"], first["acc_before"], first["asr_before"])}]
    table += [{"defense": r["defense"], "aux": r["aux_type"], "n": r["aux_size"], "C-Acc": r["acc_after"],
               "ASR": r["asr_after"], "RA": r["ra_after"], "DER": r["der"]} for r in rows]
    print(render_table(table, f"BadNets on {split} ({preset.model}, width {preset.width}); results under "
                              f"{bb_root / 'record' / record / 'defense'}"))
    print(LEGEND)
    print(reading(rows))
    return rows


LEGEND = """\
C-Acc: accuracy on the clean test set (higher is better). ASR: share of triggered test images, true class not
the target, that the model assigns to the target (lower is better). RA: share of those it assigns to their true
class (higher is better). DER: (max(0, ASR drop) - max(0, C-Acc drop) + 1) / 2; 50 % = no change, 100 % = backdoor
fully removed at no accuracy cost (higher is better). All in %; n: auxiliary images given to the defense."""


def reading(rows: list[dict[str, Any]]) -> str:
    """One line that reads the table: the best row by DER and, per auxiliary type, what GIC changed (DER points)."""
    best = max(rows, key=lambda r: r["der"])
    line = (f"Reading: {best['defense']} on {best['aux_type']} removes the most (ASR {best['asr_before']:.1%} -> "
            f"{best['asr_after']:.1%}, C-Acc {best['acc_before']:.1%} -> {best['acc_after']:.1%})")
    plain = {(r["defense"], r["aux_type"]): r for r in rows}
    effects = [f"{(r['der'] - plain[(r['defense'][4:], r['aux_type'])]['der']) * 100:+.1f} points on {r['aux_type']}"
               for r in rows if r["defense"].startswith("gic-") and (r["defense"][4:], r["aux_type"]) in plain]
    if effects:
        line += f"; GIC changes DER by {', '.join(effects)}"
    n_test = f" on {best['eval_n_clean']} test images" if best.get("eval_n_clean") else ""
    return line + f". One seed{n_test}: differences of a few points are within seed noise."


def render_table(rows: list[dict[str, Any]], title: str) -> str:
    cols = ["defense", "aux", "n", "C-Acc", "ASR", "RA", "DER"]
    fmt = lambda v: f"{v * 100:.2f}" if isinstance(v, float) else str(v)  # noqa: E731  (fractions -> percent)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The demo's flags, shared by ``bbgic demo`` and ``run_defense.py``."""
    from .commands.common import add_device_arg

    p.add_argument("--dataset", default="digits", help="digits (default, ships with scikit-learn), fashion-mnist, "
                                                       "mnist, or any dataset on disk")
    p.add_argument("--bb_root", default="bbgic_demo", help="where data/ and record/ are written (default ./bbgic_demo)")
    add_device_arg(p)
    p.add_argument("--shift", default=None, help="the shifted auxiliary type (default reserved_noise)")
    p.add_argument("--no_gic", action="store_true", help="skip the GIC rows")


def run_from_args(args: argparse.Namespace, prog: str = "run_defense.py") -> int:
    from .utils.logs import console_logging

    console_logging(logging.WARNING)
    try:
        run_demo(args.dataset, args.bb_root, args.device, gic=not args.no_gic, shift=args.shift)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_defense.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_args(p)
    return run_from_args(p.parse_args(argv))
