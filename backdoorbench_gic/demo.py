"""The embedded demo (``bbgic demo``, or ``python run_defense.py`` with no arguments in a clone): a real backdoor
attack and its removal, on data that ships offline, in a few minutes on two CPU cores.

1. split the dataset BackdoorBenchER's way (``<ds>_split_<pct>_seed_0``: train / reserved / test);
2. train a BadNets victim on the train part (or reuse the record if one made with the same settings is cached);
3. purify it with the preset's defense (FST on digits) on (a) the reserved, in-distribution auxiliary set and
   (b) a shifted copy of it, each without and with Guided Input Calibration;
4. print one table: C-Acc, ASR, RA and DER per row, in percent, with a legend and a reading that calls each row a
   success or a failure (ASR <= 10 % and C-Acc at most 5 points below the victim's) and says what GIC did.

The digits settings (FST, 30 epochs, 20 % of the victim's training set as auxiliary data) were chosen on held-out
data, never on the test set: the reserved images the defense does not get, clean and with the victim's trigger
(:func:`heldout_check`, ``benchmarks/demo_settings.py``; every trial is in ``benchmarks/results/demo_settings.md``):
every row a success there with the worst ASR at most 5 %, then the cheapest.

Everything lands under ``--bb_root`` (default ``./bbgic_demo``) in BackdoorBench's layout, so the record can be
inspected (``bbgic inspect``) and purified again with any defense.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
    shift: str
    defense: str = "ft"
    defense_keys: Mapping[str, Any] = field(default_factory=dict)  # the defense's config keys (epochs, lr, ...)


PRESETS: dict[str, Preset] = {
    # 1,797 images, 1,437 of them training images: a 30 % reserved split leaves 1,006 for the victim; the defense
    # gets 20 % of that (201 reserved images) and the other 230 reserved images are the held-out set the defense
    # settings were chosen on (benchmarks/demo_settings.py; the test set is never looked at for a choice): FST for
    # 30 epochs left ASR 2.9-4.9 % there (FST 20 epochs 4.4-6.9 %; FT 60 epochs at lr 0.05 0-0.5 % at 2-3 C-Acc
    # points and twice the time)
    "digits": Preset(30, "preactresnet18", 16, 20, 32, 0.02, 0.2, "reserved_noise", "fst", {"epochs": 30}),
    "mnist": Preset(5, "preactresnet18", 16, 2, 128, 0.01, 0.05, "reserved_noise", "ft", {"epochs": 10}),
    "fashion-mnist": Preset(5, "preactresnet18", 16, 3, 128, 0.01, 0.05, "reserved_noise", "ft", {"epochs": 10}),
}
DEFAULT_PRESET = Preset(5, "preactresnet18", 16, 3, 128, 0.01, 0.05, "reserved_noise", "ft", {"epochs": 10})


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def ensure_split(dataset: str, pct: int, bb_root: Path) -> str:
    from .auxdata import make_split
    from .data.specs import split_name

    name = split_name(dataset, pct, 0)
    make_split(dataset, pct / 100.0, 0, dataset_path="./data", bb_root=bb_root)
    return name


def attack_config(split: str, preset: Preset, record: str, device: str) -> dict[str, Any]:
    """The demo victim's attack keys (what ``bbgic attack`` would take)."""
    return {"attack": "badnet", "dataset": split, "model": preset.model, "width": preset.width,
            "epochs": preset.attack_epochs, "batch_size": preset.attack_batch, "lr": preset.attack_lr,
            "save_folder_name": record, "device": device, "random_seed": 0}


def _same_victim(record_dir: Path, cfg: dict[str, Any]) -> bool:
    """Whether the record's stored args (``info.pickle``) were trained with ``cfg``'s keys (the device aside)."""
    from .checkpoint import safe_torch_load

    try:
        info = safe_torch_load(record_dir / "info.pickle")
    except (OSError, ValueError, RuntimeError):
        return False
    return all(info.get(k) == v for k, v in cfg.items() if k not in ("device", "save_folder_name"))


def ensure_victim(split: str, preset: Preset, bb_root: Path, record: str, device: str) -> Path:
    from .attacks import run_attack
    from .records import inspect_record

    record_dir = bb_root / "record" / record
    cfg = attack_config(split, preset, record, device)
    if (record_dir / "attack_result.pt").is_file():
        report = inspect_record(record_dir, bb_root)
        if report.valid and _same_victim(record_dir, cfg):
            print(f"      reusing the cached victim {record_dir}", file=sys.stderr)
            return record_dir
        why = "; ".join(report.problems) if not report.valid else "made with other settings"
        print(f"      the cached record is not usable ({why}); making it again", file=sys.stderr)
    return run_attack(cfg, bb_root=bb_root, overwrite=True)


def prepare(dataset: str, bb_root: str | Path, device: str, preset: Preset | None = None) -> tuple[Preset, Path, str]:
    """Stages 1 and 2: the split and the victim (reused when cached). Returns (preset, bb_root, record name)."""
    preset = preset or PRESETS.get(dataset, DEFAULT_PRESET)
    bb_root = Path(bb_root).resolve()
    bb_root.mkdir(parents=True, exist_ok=True)
    _stage(1, 4, f"split {dataset} into train / reserved ({preset.split_pct} %) / test under {bb_root / 'data'}")
    split = ensure_split(dataset, preset.split_pct, bb_root)
    record = f"demo_{dataset}_badnet"
    _stage(2, 4, f"BadNets victim ({preset.model}, width {preset.width}, {preset.attack_epochs} epochs) on {split}")
    ensure_victim(split, preset, bb_root, record, device)
    return preset, bb_root, record


def requests(preset: Preset, record: str, bb_root: Path, device: str, gic: bool = True, shift: str | None = None,
             output_root: Path | None = None):
    """The demo's purification runs: the preset's defense on ``reserved`` and on the shifted type, then (``gic``)
    the same with GIC in front. ``output_root``: write each run under it instead of the record's defense/ folder."""
    from .pipeline import DefenseRequest

    shift = shift or preset.shift
    runs = [(preset.defense, "reserved"), (preset.defense, shift)]
    if gic:
        runs += [(f"gic-{preset.defense}", "reserved"), (f"gic-{preset.defense}", shift)]
    return [DefenseRequest(result_file=record, defense=defense, bb_root=str(bb_root), device=device,
                           overrides={**preset.defense_keys, "reserved_type": aux, "ratio": preset.aux_ratio},
                           output_dir=None if output_root is None else str(output_root / defense / aux),
                           monitor_every=0)
            for defense, aux in runs]


def run_demo(dataset: str = "digits", bb_root: str | Path = "bbgic_demo", device: str = "auto", gic: bool = True,
             shift: str | None = None) -> list[dict[str, Any]]:
    from .evaluation import der
    from .pipeline import run_defense

    t0 = time.perf_counter()
    preset, bb_root, record = prepare(dataset, bb_root, device)
    reqs = requests(preset, record, bb_root, device, gic, shift)
    rows = []
    for i, req in enumerate(reqs, start=1):
        _stage(3, 4, f"purify ({i}/{len(reqs)}): {req.defense} on {req.overrides['reserved_type']}")
        rows.append(run_defense(req))
    _stage(4, 4, f"done in {time.perf_counter() - t0:.0f} s")
    first = rows[0]
    table = [{"defense": "none (victim)", "aux": "-", "n": "-", "C-Acc": first["acc_before"],
              "ASR": first["asr_before"], "RA": first["ra_before"],
              "DER": der(first["acc_before"], first["asr_before"], first["acc_before"], first["asr_before"])}]
    table += [{"defense": r["defense"], "aux": r["aux_type"], "n": r["aux_size"], "C-Acc": r["acc_after"],
               "ASR": r["asr_after"], "RA": r["ra_after"], "DER": r["der"]} for r in rows]
    keys = ", ".join(f"{k} {v}" for k, v in preset.defense_keys.items())
    print(render_table(table, f"BadNets on {first['dataset']} ({preset.model}, width {preset.width}); "
                              f"{preset.defense}{f' ({keys})' if keys else ''}, settings chosen on held-out reserved "
                              "images, never on the test set"))
    print(LEGEND)
    print(reading(rows))
    print(f"wrote the victim and every run's files under {bb_root / 'record' / record} "
          f"(runs: {bb_root / 'record' / record / 'defense'})")
    return rows


def heldout_check(dataset: str = "digits", bb_root: str | Path = "bbgic_demo", device: str = "auto",
                  preset: Preset | None = None, gic: bool = True, shift: str | None = None) -> list[dict[str, Any]]:
    """How the demo's runs (with ``preset``'s settings) do on held-out data, never on the test set: each
    purified model's C-Acc on the reserved images its defense did not get, and its ASR on those images stamped
    with the victim's trigger (:func:`~.evaluation.heldout_sets`, the record's attack rebuilt from its settings). This is what the demo's settings
    were chosen on (``benchmarks/demo_settings.py``). The runs write into a temporary folder; the test metrics the
    pipeline computes are dropped from the rows."""
    import tempfile

    from .auxdata import build_aux_set
    from .evaluation import evaluate, heldout_sets, purification_success
    from .keys import gic_summary_line
    from .models import build_model_for_state_dict
    from .pipeline import run_defense
    from .records import load_attack_record
    from .results import load_defense_result
    from .utils.runtime import resolve_device

    preset, bb_root, name = prepare(dataset, bb_root, device, preset)
    record = load_attack_record(name, bb_root)
    victim = record.build_model()
    dev = resolve_device(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bbgic-heldout-") as tmp:
        reqs = requests(preset, name, bb_root, device, gic, shift, output_root=Path(tmp))
        for i, req in enumerate(reqs, start=1):
            aux_type = req.overrides["reserved_type"]
            _stage(3, 4, f"held-out check ({i}/{len(reqs)}): {req.defense} on {aux_type}")
            held, bd_held = heldout_sets(record, build_aux_set(record, aux_type, ratio=preset.aux_ratio, seed=0).indices)
            row = run_defense(req, record=record)
            state = load_defense_result(Path(req.output_dir) / "defense_result.pt")["model"]
            purified = build_model_for_state_dict(record.model_name, record.num_classes, state, record.clean_data)
            purified.net.load_state_dict(state)
            before = evaluate(victim, held, bd_held, device=dev)
            after = evaluate(purified.eval(), held, bd_held, device=dev)
            rows.append({"defense": row["defense"], "aux_type": aux_type, "aux_size": row["aux_size"],
                         "heldout_n_clean": after.n_clean, "heldout_n_bd": after.n_bd,
                         "acc_before": before.acc, "asr_before": before.asr, "acc_after": after.acc,
                         "asr_after": after.asr, "ra_after": after.ra,
                         "success": purification_success(before.acc, after.acc, after.asr),
                         "gic": gic_summary_line(row, "extra_"), "defense_seconds": row["defense_seconds"]})
    return rows


LEGEND = """\
C-Acc: accuracy on the clean test set (higher is better). ASR: share of triggered test images, true class not
the target, that the model assigns to the target (lower is better). RA: share of those it assigns to their true
class (higher is better). DER: (max(0, ASR drop) - max(0, C-Acc drop) + 1) / 2; 50 % = no change, 100 % = backdoor
fully removed at no accuracy cost (higher is better). All in %; n: auxiliary images given to the defense."""


def reading(rows: list[dict[str, Any]]) -> str:
    """What the table says, row by row: success or failure by the README's rule (ASR after <= 10 % and C-Acc at
    most 5 points below the victim's), and for a GIC row what calibration did (D_BN before -> after, drift)."""
    import textwrap

    from .evaluation import purification_success
    from .keys import gic_summary_line

    lines = ["Reading (success: ASR after <= 10 % and C-Acc at most 5 points below the victim's):"]

    def add(text: str, indent: str) -> None:  # within 120 characters, continuation lines indented
        lines.extend(textwrap.wrap(text, 120, initial_indent=indent, subsequent_indent=indent + "  "))

    for r in rows:
        ok = purification_success(r["acc_before"], r["acc_after"], r["asr_after"])
        misses = [f"ASR {r['asr_after']:.1%} > 10 %"] if r["asr_after"] > 0.10 else []
        if r["acc_before"] - r["acc_after"] > 0.05:
            misses.append(f"C-Acc {100 * (r['acc_before'] - r['acc_after']):.1f} points down")
        verdict = "success" if ok else f"failure ({', '.join(misses)})"
        add(f"{r['defense']} on {r['aux_type']}: {verdict}: ASR {r['asr_before']:.1%} -> {r['asr_after']:.1%}, "
            f"C-Acc {r['acc_before']:.1%} -> {r['acc_after']:.1%}", "  ")
        gic = gic_summary_line(r, "extra_")
        if gic:
            add(gic, "    ")
    if any(gic_summary_line(r, "extra_") for r in rows):
        add("GIC: D_BN is how far the auxiliary images' BatchNorm statistics are from the victim's training data "
            "(0 = identical); calibration g(x) lowers it before the defense trains on g(aux). README, \"Reading the "
            "results\", explains the drift.", "  ")
    n_test = f" on {rows[0]['eval_n_clean']} test images" if rows and rows[0].get("eval_n_clean") else ""
    add(f"One seed{n_test}: differences of a few points are within seed noise.", "  ")
    return "\n".join(lines)


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
        from .cli import report_error

        return report_error(prog, exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import plain_help

    p = argparse.ArgumentParser(prog="run_defense.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_args(p)
    return run_from_args(plain_help(p).parse_args(argv))
