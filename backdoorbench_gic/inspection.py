"""``bbgic inspect``: what an attack record holds and whether it is usable, optionally re-evaluated against the
numbers the attack logged (``attack_df_summary.csv``)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .records import load_attack_record


@dataclass
class InspectReport:
    valid: bool
    facts: dict[str, Any]
    problems: list[str]
    warnings: list[str]

    def render(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.facts.items()]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("VALID" if self.valid else "INVALID")
        return "\n".join(lines)


def _raise_if_installation(exc: Exception) -> None:
    """A torch/torchvision build mismatch is the installation's fault, not the record's: raise it as such
    (:mod:`.environment`) instead of reporting the record invalid."""
    from .environment import as_build_mismatch

    mismatch = as_build_mismatch(exc)
    if mismatch is not None:
        raise mismatch from None


def inspect_record(result_file: str | os.PathLike, bb_root=None, *, trust: bool = False, evaluate: bool = False,
                   device: str | None = None, batch_size: int = 512, dataset_dir=None) -> InspectReport:
    """What a record holds and whether it is usable; with ``evaluate``, recompute C-Acc/ASR/RA and compare them
    with ``attack_df_summary.csv``'s ``last`` row."""
    facts: dict[str, Any] = {}
    problems: list[str] = []
    warnings: list[str] = []
    try:
        rec = load_attack_record(result_file, bb_root, trust=trust, dataset_dir=dataset_dir)
    except Exception as exc:  # the reason is the report (unless the installation is at fault)
        _raise_if_installation(exc)
        return InspectReport(False, {"record": str(result_file)}, [f"{type(exc).__name__}: {exc}"], [])
    facts["record"] = str(rec.record_dir)
    facts["bb_root"] = str(rec.bb_root)
    facts["model"] = rec.model_name
    facts["num_classes"] = rec.num_classes
    facts["image size (H, W, C)"] = rec.img_size
    facts["clean data"] = f"{rec.clean_data} at {rec.dataset_dir()}"
    facts["attack target(s)"] = f"{rec.targets} ({rec.label_mode})"
    if rec.bd_train_state is not None:
        flipped = sum(1 for _, b, o in rec.bd_train_state.entries.values() if b != o)
        facts["bd_train poisoned"] = (f"{len(rec.bd_train_state.entries)} of {len(rec.bd_train_state.poison_indicator)} "
                                      f"({flipped} label-flipped)")
    else:
        facts["bd_train poisoned"] = "none stored"
    facts["bd_test poisoned"] = f"{len(rec.bd_test_state.entries)} of {len(rec.bd_test_state.poison_indicator)}"
    per_class = Counter(o for _, _, o in rec.bd_test_state.entries.values())
    if rec.target is not None and per_class.get(rec.target, 0):
        warnings.append(f"bd_test contains {per_class[rec.target]} samples of the target class")
    missing = []
    for which in ("bd_train", "bd_test"):
        miss = rec.missing_pngs(which)
        if miss:
            missing.append(f"{which}: {len(miss)} missing PNGs (first: {miss[0]})")
    facts["missing PNGs"] = "; ".join(missing) if missing else 0
    problems += missing
    try:
        spec = rec.spec
        if spec.num_classes != rec.num_classes:
            problems.append(f"num_classes {rec.num_classes} but dataset {rec.clean_data} has {spec.num_classes}")
        if tuple(spec.input_shape) != tuple(rec.img_size):
            problems.append(f"img_size {rec.img_size} but dataset {rec.clean_data} is {spec.input_shape}")
    except KeyError as exc:
        problems.append(str(exc))
    try:
        model = rec.build_model()
        facts["parameters"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:
        _raise_if_installation(exc)
        problems.append(f"model does not load: {exc}")
        model = None
    if evaluate and model is not None and not problems:
        from .evaluation import evaluate as run_eval
        from .utils.runtime import resolve_device

        try:
            m = run_eval(model, rec.clean_test, rec.bd_test, device=resolve_device(device), batch_size=batch_size)
        except Exception as exc:
            _raise_if_installation(exc)
            problems.append(f"evaluation failed: {type(exc).__name__}: {exc}")
        else:
            facts["evaluated"] = f"C-Acc {m.acc:.2%}  ASR {m.asr:.2%}  RA {m.ra:.2%}"
            summary = rec.attack_summary()
            if summary is None:
                warnings.append("no attack_df_summary.csv row 'last' to compare with")
            else:
                logged = {k: summary.get(k) for k in ("test_acc", "test_asr", "test_ra")}
                facts["logged (attack_df_summary.csv, last)"] = "  ".join(
                    f"{k} {v:.2%}" for k, v in logged.items() if v is not None)
                ours = {"test_acc": m.acc, "test_asr": m.asr, "test_ra": m.ra}
                # counts are integers over known denominators: agreement is exact up to float formatting
                diffs = {k: (ours[k], v) for k, v in logged.items() if v is not None and abs(ours[k] - v) > 1e-6}
                if diffs:
                    problems.append("recomputed metrics disagree with the record's attack_df_summary.csv: " + ", ".join(
                        f"{k} {a:.6f} vs logged {b:.6f}" for k, (a, b) in diffs.items())
                        + " -- a loader mismatch (wrong data on disk?) or a tampered record")
    return InspectReport(not problems, facts, problems, warnings)
