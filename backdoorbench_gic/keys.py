"""The names of a finished cell's result columns, defined once.

A defense reports what it measured besides the metrics in ``PurifyResult.extras`` (a dict); the pipeline copies
every scalar entry into the tidy row (``result.json``) as ``extra_<key>``. The analysis reads those columns back.
Both sides name them through this module, so a rename is one edit here and a typo is an ``AttributeError``
instead of a table cell that silently turns into "-".
"""
from __future__ import annotations

EXTRA_PREFIX = "extra_"


def extra_column(key: str) -> str:
    """The tidy-row column holding ``PurifyResult.extras[key]``."""
    return EXTRA_PREFIX + key


class GicInfo:
    """Keys of what :class:`~backdoorbench_gic.gic.defense.GICDefense` puts into ``PurifyResult.extras``."""

    SECONDS = "gic_seconds"  # wall time of a fresh fit (a cached fit keeps the seconds it cost when made)
    STEPS = "gic_steps"  # optimiser steps the fit ran
    DELTA = "gic_delta"
    FINAL_LOSS = "gic_final_loss"
    CACHED = "gic_cached"  # 1.0 when the fit came from the cache, 0.0 when fitted in this run
    TOTAL_SECONDS = "gic_total_seconds"  # fitting (or loading) and applying every calibrator of the set
    BN_DIV_BEFORE = "bn_div_before"  # dataset-level D_BN of aux (as ``bbgic aux-quality`` reports it)
    BN_DIV_AFTER = "bn_div_after"  # the same of g(aux)
    BASE_SECONDS = "base_seconds"  # the wrapped base defense's purification time
    PLACEMENT_SECONDS = "placement_seconds"  # the BatchNorm passes of a placement after purification
    DRIFT_CLASS = "drift_class"  # the label-free drift monitor (gic/drift.py DriftReport.as_row)
    DRIFT_SHARE = "drift_share"
    DRIFT_RATIO = "drift_ratio"
    DRIFT_RAW_SHARE = "drift_raw_share"
    DRIFT_FLAG = "drift_flag"


class Col:
    """Columns of the tidy row (``result.json`` of a cell; ``collect_results`` frames)."""

    ATTACK = "attack"
    MODEL = "model"
    DATASET = "dataset"
    DEFENSE = "defense"
    BASE_DEFENSE = "base_defense"  # matrix cells: the purification defense GIC wraps (or the defense itself)
    DEFENSE_LABEL = "defense_label"
    GIC = "gic"
    AUX_TYPE = "aux_type"
    AUX_SIZE = "aux_size"
    AUX_SIZE_LABEL = "aux_size_label"
    SEED = "seed"
    ACC_BEFORE, ASR_BEFORE, RA_BEFORE = "acc_before", "asr_before", "ra_before"
    ACC_AFTER, ASR_AFTER, RA_AFTER = "acc_after", "asr_after", "ra_after"
    DER, RIR = "der", "rir"
    EVAL_N_CLEAN, EVAL_N_BD = "eval_n_clean", "eval_n_bd"
    DEFENSE_SECONDS = "defense_seconds"
    WALL_SECONDS = "wall_seconds"
    CELL_DIR = "cell_dir"
    # what GIC measured, as the pipeline names it in the row
    GIC_SECONDS = extra_column(GicInfo.SECONDS)
    GIC_STEPS = extra_column(GicInfo.STEPS)
    GIC_CACHED = extra_column(GicInfo.CACHED)
    BN_DIV_BEFORE = extra_column(GicInfo.BN_DIV_BEFORE)
    BN_DIV_AFTER = extra_column(GicInfo.BN_DIV_AFTER)
    BASE_SECONDS = extra_column(GicInfo.BASE_SECONDS)
    PLACEMENT_SECONDS = extra_column(GicInfo.PLACEMENT_SECONDS)
    DRIFT_RATIO = extra_column(GicInfo.DRIFT_RATIO)
    DRIFT_FLAG = extra_column(GicInfo.DRIFT_FLAG)
    # post-purification probes (probes.py): _before the victim, _after the purified model, _control the clean model
    PROBES = "probes"  # which probes ran, comma-separated
    PROBE_FINGERPRINT = "probe_fingerprint"  # hash of the probe settings they ran with
    ASR_HALF_BEFORE, ASR_HALF_AFTER = "asr_half_before", "asr_half_after"  # plain ASR on ASR-refresh's images
    ASR_REFRESH_BEFORE, ASR_REFRESH_AFTER = "asr_refresh_before", "asr_refresh_after"
    ACC_HALF_BEFORE, ACC_HALF_AFTER = "acc_half_before", "acc_half_after"
    ACC_REFRESH_BEFORE, ACC_REFRESH_AFTER = "acc_refresh_before", "acc_refresh_after"
    P_ASR_BEFORE, P_ASR_AFTER, P_ASR_CONTROL = "p_asr_before", "p_asr_after", "p_asr_control"
    P_ACC_BEFORE, P_ACC_AFTER, P_ACC_CONTROL = "p_acc_before", "p_acc_after", "p_acc_control"
    REFRESH_N, HALF_N_BD = "refresh_n", "half_n_bd"  # images re-estimated on / poisoned images measured on
    RETUNE_N, RETUNE_N_POISON = "retune_n", "retune_n_poison"  # the retuning set and its poisoned part
    PROBE_SECONDS, CONTROL_SECONDS = "probe_seconds", "control_seconds"


def per_source_key(key: str, source: str) -> str:
    """The key of one source's value in a mixed set's GIC info or summary: ``bn_div_before[external:digits]``."""
    return f"{key}[{source}]"


def per_source_values(values, key: str, prefix: str = "") -> dict[str, float]:
    """{source: value} of every ``<prefix><key>[<source>]`` entry of ``values``, in the order they appear."""
    head = f"{prefix}{key}["
    return {k[len(head):-1]: float(v) for k, v in values.items() if k.startswith(head) and k.endswith("]")
            and v is not None}


def gic_summary_line(values, prefix: str = "") -> str | None:
    """GIC's fit summary for people (delta, D_BN before -> after, drift), from its info and summary keys (in a tidy
    row they sit under ``prefix`` = ``extra_``); None when the values hold no calibration."""
    def get(key: str):
        return values.get(prefix + key)

    if get(GicInfo.DELTA) is None and get(GicInfo.BN_DIV_BEFORE) is None and get(GicInfo.DRIFT_CLASS) is None:
        return None
    parts = []
    if get(GicInfo.DELTA) is not None:
        parts.append(f"delta {float(get(GicInfo.DELTA)) * 255:.1f}/255")
    if get(GicInfo.BN_DIV_BEFORE) is not None and get(GicInfo.BN_DIV_AFTER) is not None:
        parts.append(f"D_BN {float(get(GicInfo.BN_DIV_BEFORE)):.4f} -> {float(get(GicInfo.BN_DIV_AFTER)):.4f}")
        before = per_source_values(values, GicInfo.BN_DIV_BEFORE, prefix)
        after = per_source_values(values, GicInfo.BN_DIV_AFTER, prefix)
        if before:
            parts[-1] += " (" + ", ".join(f"{s} {b:.4f} -> {after[s]:.4f}" for s, b in before.items() if s in after) + ")"
    if get(GicInfo.DRIFT_CLASS) is not None:  # the drift monitor (gic/drift.py): the class g pulled most towards
        share = float(get(GicInfo.DRIFT_SHARE))
        against = [f"{share / float(get(GicInfo.DRIFT_RATIO)):.1%} of the labels"] if get(GicInfo.DRIFT_RATIO) else []
        if get(GicInfo.DRIFT_RAW_SHARE) is not None:
            against.append(f"{float(get(GicInfo.DRIFT_RAW_SHARE)):.1%} before calibration")
        parts.append(f"drift: on g(aux) the victim predicts class {int(get(GicInfo.DRIFT_CLASS))} (the class that gained "
                     f"most) for {share:.1%} of the images" + (f", against {' and '.join(against)}" if against else "")
                     + (": WARNING, predictions concentrate on it, as on a backdoor's target" if get(GicInfo.DRIFT_FLAG)
                        else ": not concentrated"))
    return "GIC: " + ", ".join(parts)
