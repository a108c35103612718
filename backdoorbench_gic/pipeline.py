"""One purification run end to end: record -> auxiliary set -> defense -> evaluation -> BackdoorBench files.

This is the only place that ties the stages together; ``run_defense.py``, ``bbgic defend``, the matrix runner
and the BackdoorBench patch all call :func:`run_defense`. The defense never sees test data: the pipeline
evaluates before and after, and (when ``monitor_every`` > 0, opt-in) logs test metrics per epoch through the
defense's monitor callback, as BackdoorBench's CSVs do. The victim's metrics are cached by content and a model
evaluated twice with the same weights (the last epoch's monitor, the final result) is scored once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, marked_keys
from .defenses import purify_cache
from .evaluation import Metrics, WeightsMemo, compare, eval_sets, evaluate
from .records import AttackRecord, load_attack_record
from .keys import extra_column
from .probes import Prober, ProbeSettings, probe_request
from .registry import DEFENSES
from .results import MetricLog, defense_output_dir, write_defense_result, write_tidy_row
from .utils.cache import cache_dir, content_key, load_or_compute
from .utils.io import atomic_write_json
from .utils.logs import run_log, timestamp
from .utils.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class DefenseRequest:
    """Everything one run needs; the fields mirror BackdoorBench's defense CLI."""

    result_file: str
    defense: str
    bb_root: str | None = None
    dataset: str | None = None  # default: the record's clean_data
    yaml_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # explicit CLI flags (highest precedence)
    device: str | None = None
    output_dir: str | None = None  # default: <record>/defense/<defense>/<variant>
    variant: str | None = None  # default: yaml basename, else <dataset>_<reserved_type>
    n_per_class: int | None = None
    aux_options: dict[str, Any] = field(default_factory=dict)
    monitor_every: int = 0  # evaluate on the test sets every N epochs (0: only at the end; opt-in)
    trust_checkpoint: bool = False
    dataset_dir: str | None = None
    progress: bool | None = None
    eval_batch_size: int = 512
    # evaluate on a fixed subset of at most this many clean and this many poisoned test images (None: all).
    # For CPU-scale matrices only: the subset is the same for every cell and is recorded in the row.
    eval_limit: int | None = None
    extra_row: dict[str, Any] = field(default_factory=dict)  # copied into the tidy row (matrix cell keys)
    probes: list[str] = field(default_factory=list)  # post-purification probes (probes.py): refresh, retune
    probe_options: dict[str, Any] = field(default_factory=dict)  # ProbeSettings keys, e.g. {"retune.epochs": 3}


def victim_metrics(record: AttackRecord, model: torch.nn.Module, device: torch.device, batch_size: int = 512,
                   eval_limit: int | None = None) -> Metrics:
    """The victim's own C-Acc/ASR/RA, cached in the cache directory (``$BBGIC_CACHE_DIR/victim_metrics``, keyed by
    a hash of its weights and of the test images it is measured on), so that the cells of a matrix do not
    re-evaluate the same victim. Nothing is written next to the record: inputs stay read-only."""
    clean_test, bd_test = eval_sets(record, eval_limit)
    key = content_key(weights=record.state_dict, data=(clean_test, bd_test), length=24)
    metrics, _ = load_or_compute(
        cache_dir() / "victim_metrics" / f"{key}.json",
        lambda: evaluate(model, clean_test, bd_test, device=device, batch_size=batch_size),
        load=lambda path: Metrics(**json.loads(path.read_text())["metrics"]),
        save=lambda m, path: atomic_write_json(path, {"record": record.name, "eval_limit": eval_limit,
                                                      "metrics": m.as_dict()}),
        what="victim metrics")
    return metrics


# The run-level keys that vary per cell by design (per_run) or only change where and how fast a run goes, not what
# it computes (not_identity), from RunConfig's field metadata.
PER_RUN_KEYS = marked_keys(RunConfig, "per_run") | marked_keys(RunConfig, "identity")


def config_fingerprint(defense) -> str:
    """Hash of the resolved configuration (and a wrapped base defense's), without per-run keys. Two results of
    one matrix entry with different fingerprints were computed with different settings, e.g. because a packaged
    yaml changed between runs; the report warns about that instead of mixing them silently."""
    parts = []
    while defense is not None:
        parts.append({k: v for k, v in defense.settings().items() if k not in PER_RUN_KEYS})
        defense = getattr(defense, "base", None)
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_variant(dataset: str, reserved_type: str, yaml_path: str | None) -> str:
    """BackdoorBenchER names the output folder after the yaml file; without one we use the name its
    config_edit.py would have given the yaml (``<dataset>_<reserved_type>``)."""
    if yaml_path:
        return Path(yaml_path).stem
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in reserved_type)
    return f"{dataset}_{safe}"


def output_dir(req: DefenseRequest, record_dir: str | os.PathLike, defense_name: str, dataset: str,
               reserved_type: str) -> Path:
    """Where a run writes: ``req.output_dir``, else ``<record>/defense/<name>/<variant>``."""
    if req.output_dir:
        return Path(req.output_dir)
    variant = req.variant or default_variant(dataset, reserved_type, req.yaml_path)
    return defense_output_dir(record_dir, defense_name, variant)


def check_request(req: DefenseRequest, record: AttackRecord):
    """Everything about a run that can be checked without building a model or decoding an image (the auxiliary
    request against the record's dataset, the defense's config, the evaluation settings); returns the configured
    defense. :func:`run_defense` calls it first, and ``bbgic matrix validate`` calls it for every cell, so a
    request that passes here cannot fail on such a check later. The device is not checked: a run may go to
    another machine."""
    from .auxdata import check_aux_request

    # the auxiliary request is checked once, before anything heavy: from the command line (the usual case) before
    # the defenses load, else (or where the yaml gives what the command line left out) as the defense resolves it
    def effective(reserved_type, index, ratio):  # what the check reads: n_per_class takes precedence over ratio
        return str(reserved_type), index, None if req.n_per_class else ratio

    checked = None
    if "reserved_type" in req.overrides:
        checked = effective(req.overrides["reserved_type"], req.overrides.get("index"), req.overrides.get("ratio"))
        check_aux_request(record, checked[0], options=req.aux_options, n_per_class=req.n_per_class,
                          index_file=checked[1], ratio=checked[2])
    defense_cls = DEFENSES.get(req.defense)
    overrides = dict(req.overrides)
    if req.device is not None:
        overrides["device"] = req.device
    defense = defense_cls.from_sources(req.dataset or record.clean_data, req.yaml_path, overrides,
                                       name=DEFENSES.resolve(req.defense))
    cfg = defense.run_config  # the auxiliary draw, seed and device (a wrapper's are its base's)
    resolved = effective(cfg.reserved_type, cfg.index, cfg.ratio)
    if resolved != checked:  # resolved from a yaml: checked here, before the model is built
        check_aux_request(record, resolved[0], options=req.aux_options, n_per_class=req.n_per_class,
                          index_file=resolved[1], ratio=resolved[2])
    if req.eval_limit is not None and req.eval_limit < 1:
        raise ValueError(f"eval_limit must be a positive number of test images, got {req.eval_limit}")
    if req.monitor_every < 0:
        raise ValueError(f"monitor_every must be >= 0 (0: evaluate only at the end), got {req.monitor_every}")
    if req.probes or req.probe_options:  # what the record cannot probe (no bd_train, no BatchNorm, a budget too large)
        probe_request(record, req.probes, req.probe_options)
    return defense


def run_defense(req: DefenseRequest, record: AttackRecord | None = None) -> dict[str, Any]:
    """Run one defense on one record; returns the tidy result row (also written as result.json)."""
    from .auxdata import build_aux_set
    from .auxdata.shifts import shift_warning
    from .data.transforms import TrainAugment

    t0 = time.perf_counter()
    record = record or load_attack_record(req.result_file, req.bb_root, trust=req.trust_checkpoint,
                                          dataset_dir=req.dataset_dir)
    dataset = req.dataset or record.clean_data
    defense = check_request(req, record)
    cfg = defense.run_config  # the auxiliary draw, seed and device (a wrapper's are its base's)
    device = resolve_device(cfg.device)
    probe_settings = ProbeSettings.from_dict(req.probe_options) if req.probes else None  # checked above
    out_dir = output_dir(req, record.record_dir, defense.name, dataset, cfg.reserved_type)
    out_dir.mkdir(parents=True, exist_ok=True)

    with run_log(out_dir / "log", timestamp()) as log_path:
        log.info("defense %s on %s (%s), aux %s, seed %d, device %s", defense.name, record.name, dataset,
                 cfg.reserved_type, cfg.random_seed, device)
        log.info("config: %r", defense.config)
        seed_everything(cfg.random_seed)
        victim = record.build_model().to(device)
        before = victim_metrics(record, victim, device, req.eval_batch_size, req.eval_limit)
        clean_test, bd_test = eval_sets(record, req.eval_limit)
        log.info("victim: C-Acc %.4f ASR %.4f RA %.4f", before.acc, before.asr, before.ra)

        t_aux = time.perf_counter()
        aux = build_aux_set(record, cfg.reserved_type, ratio=None if req.n_per_class else cfg.ratio,
                            n_per_class=req.n_per_class, seed=cfg.random_seed, index_file=cfg.index,
                            victim=victim, device=device, options=req.aux_options)
        aux_seconds = time.perf_counter() - t_aux
        log.info("auxiliary set %s: %d images, class counts %s", cfg.reserved_type, len(aux),
                 aux.class_counts(record.num_classes).tolist())

        epoch_counter = {"n": 0}
        scored = WeightsMemo(clean_test, bd_test, device=device, batch_size=req.eval_batch_size)

        def monitor(model: torch.nn.Module) -> dict[str, float]:
            epoch_counter["n"] += 1
            if req.monitor_every and epoch_counter["n"] % req.monitor_every == 0:
                return scored(model).as_row()
            return {}

        torch.manual_seed(cfg.random_seed)
        t_def = time.perf_counter()
        result = purify_cache.purify(defense, victim, aux, device=device,
                                     train_augment=TrainAugment.for_spec(record.spec), monitor=monitor,
                                     progress=req.progress)
        defense_seconds = time.perf_counter() - t_def
        after = scored(result.model)
        log.info("purified: C-Acc %.4f ASR %.4f RA %.4f (%.1f s)", after.acc, after.asr, after.ra, defense_seconds)

        history = MetricLog(result.history)
        if history.rows:
            history.rows[-1].update(after.as_row())  # the 'last' row holds the final numbers
        else:
            history.add({"epoch": 0, **after.as_row()})
        net = result.model.net if hasattr(result.model, "net") else result.model
        write_defense_result(out_dir, csv_prefix=defense.prefix, model_name=record.model_name,
                             num_classes=record.num_classes, state_dict=net.state_dict(), history=history,
                             index=aux.indices.tolist())
        probe_row = {} if probe_settings is None else Prober(
            record, req.probes, probe_settings, clean_eval=clean_test, bd_eval=bd_test, device=device,
            batch_size=req.eval_batch_size, trust=req.trust_checkpoint, progress=req.progress).row(victim, result.model)
        row: dict[str, Any] = {
            "attack": record.name,
            "model": record.model_name,
            "dataset": dataset,
            "defense": defense.name,
            "aux_type": cfg.reserved_type,
            "aux_size": len(aux),
            "aux_warning": shift_warning(cfg.reserved_type),
            "seed": cfg.random_seed,
            "config_fingerprint": config_fingerprint(defense),
            **compare(before, after),
            "eval_n_clean": len(clean_test),
            "eval_n_bd": len(bd_test) if bd_test is not None else 0,
            "aux_seconds": aux_seconds,
            "defense_seconds": defense_seconds,
            "wall_seconds": time.perf_counter() - t0,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "host": platform.node(),
            "torch": torch.__version__,
            "log": os.path.relpath(log_path, out_dir),
            **{extra_column(k): v for k, v in result.extras.items() if isinstance(v, (int, float, str, bool))},
            **probe_row,
            **req.extra_row,
        }
        write_tidy_row(out_dir, row)
    return row
