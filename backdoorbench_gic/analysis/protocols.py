"""Issue 16's two protocols over a study of blocks (BENCHMARKS.md, "GIC placement and objectives"): which blocks and
variants a study holds, how their paired frames pool, and what each protocol selects and confirms. The rules
themselves (eligibility, ranking, the confirmation targets) are :mod:`.selection`'s.

A *block* is a spec that runs uncalibrated cells (its ``off`` variant) with ``role`` development, held-out or
confirmation; its *variants* are its calibrated variants and those of the files that inherit from it
(``_base_: block.yaml``, variants only), each paired with the block's uncalibrated cells by construction (the same
cell id, checked by :func:`~backdoorbench_gic.matrix.spec.pairing_problems`).

- The first protocol (:func:`first_protocol`) pools each variant over the blocks of a role that all ran it, base
  defenses together, and selects on the development pool with :data:`FIRST_RULE`.
- The per-base protocol (:func:`per_base_protocol`) pools each base defense's cells over the development blocks,
  selects per base with :data:`PER_BASE_RULE`, and confirms the selection on the fresh held-out blocks with
  :func:`~.selection.confirm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import pandas as pd

from .compare import IN_DISTRIBUTION
from .keys import Col
from .selection import Rule, by_base, confirm, confirmed, select, variant_figures

# the first protocol: pooled over base defenses, symmetric no-harm bound
FIRST_RULE = Rule(asr_rise_limit=0.01)
# the per-base protocol: each base alone, one-sided no harm, something recovered, at least 4 lossy cells
PER_BASE_RULE = Rule(asr_rise_limit=0.01, one_sided_harm=True, min_recovered=0.0, min_lossy_cells=4)
CALIBRATION_FREE = ("bn-reset", "bn-refresh")  # placements that fit no g: cheaper, preferred on a tie

if TYPE_CHECKING:
    from ..matrix.spec import MatrixSpec


def variant_label(settings: Mapping) -> str:
    """A calibrated variant's name from its GIC keys: its placement, + its family if not the prompt (``before``,
    ``before+generator``, ``bn-after``)."""
    family = settings.get("family", "prompt")
    return settings.get("placement", "before") + ("" if family == "prompt" else f"+{family}")


@dataclass
class StudyBlock:
    """A block of a study: the spec of its uncalibrated cells and, per variant label, the part storing the variant's
    calibrated cells, in report order (the block's default first, then by name)."""

    name: str
    role: str
    spec: "MatrixSpec"
    path: Path
    variants: "dict[str, MatrixSpec]" = field(default_factory=dict)  # label -> the part storing it
    files: dict[str, Path] = field(default_factory=dict)  # label -> the spec file that declares it


def study_blocks(paths: Iterable[str | Path]) -> dict[str, StudyBlock]:
    """The blocks of the spec files ``paths`` (named by the file that runs their ``off`` variant), in name order.
    A file without ``off`` adds its variants to the nearest file it inherits from that has one. Refused when a
    variant's cells would not pair with its block's (:func:`~backdoorbench_gic.matrix.spec.pairing_problems`), a
    label repeats within a block, or a block has no role."""
    from ..config import ConfigError
    from ..matrix.spec import DEFAULT, OFF, load_spec, pairing_problems

    specs = {Path(p).resolve(): load_spec(p) for p in paths}
    blocks: dict[str, StudyBlock] = {}
    for path, spec in sorted(specs.items(), key=lambda kv: kv[0].stem):
        if OFF in spec.variants:
            if spec.role is None:
                raise ConfigError(f"{path}: a study block needs a role (development, held-out or confirmation)")
            blocks[path.stem] = StudyBlock(path.stem, spec.role, spec, path)
    found: dict[str, list[tuple[bool, str, MatrixSpec, Path]]] = {}  # block -> (its own default?, label, part, file)
    for path, spec in specs.items():
        owner = path if OFF in spec.variants else next((b for b in spec.bases if b in specs and OFF in specs[b].variants),
                                                       None)
        if owner is None:
            raise ConfigError(f"{path}: runs no uncalibrated cells and inherits from no block among the study's files")
        block = blocks[owner.stem]
        problems = pairing_problems(spec, block.spec)
        if problems:
            raise ConfigError(f"{path}: its calibrated cells do not pair with {owner.name}'s uncalibrated ones: "
                              + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
        for v, g in spec.variants.items():
            if g is not None:
                part = spec.part(v)
                label = variant_label({**spec.gic_overrides, **g}) if v == DEFAULT else v
                found.setdefault(block.name, []).append((path == owner and v == DEFAULT, label, part, path))
    for name, block in blocks.items():
        # the block's own default first, then by name in the order of the files they were once named by
        # (<block>_<variant>.yaml: bn-transfer-first1 before bn-transfer), so reports keep their row order
        entries = sorted(found.get(name, []), key=lambda e: (not e[0], e[1] + ".yaml"))
        labels = [e[1] for e in entries]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"block {name}: variant {next(x for x in labels if labels.count(x) > 1)!r} is declared twice")
        for _, label, part, path in entries:
            block.variants[label] = part
            block.files[label] = path
    return blocks


def paired_frame(uncalibrated: pd.DataFrame, calibrated: pd.DataFrame) -> pd.DataFrame:
    """A variant's paired frame: a block's uncalibrated cells with the variant's calibrated ones."""
    off = uncalibrated[~uncalibrated[Col.GIC].astype(bool)]
    on = calibrated[calibrated[Col.GIC].astype(bool)]
    return pd.concat([off, on], ignore_index=True)


def rule_figures(df: pd.DataFrame, rule: Rule = FIRST_RULE) -> tuple[dict, pd.DataFrame]:
    """A paired frame's figures (:func:`~.selection.variant_figures`) with ``eligible`` under ``rule``, and the
    per-cell gaps behind them."""
    fig, gaps = variant_figures(df)
    fig["eligible"] = rule.eligible(fig)
    return fig, gaps


def pooled_figures(frames: Mapping[str, Mapping[str, pd.DataFrame]], blocks: list[str],
                   rule: Rule = FIRST_RULE) -> dict[str, dict]:
    """Per variant run by every one of ``blocks`` (two or more), the figures of their paired frames pooled."""
    if len(blocks) < 2:
        return {}
    out = {}
    for v in sorted({v for b in blocks for v in frames[b]}):
        dfs = [frames[b][v] for b in blocks if v in frames[b]]
        if len(dfs) == len(blocks):
            out[v], _ = rule_figures(pd.concat(dfs, ignore_index=True), rule)
    return out


def first_protocol(frames: Mapping[str, Mapping[str, pd.DataFrame]], development: list[str], held_out: list[str],
                   rule: Rule = FIRST_RULE, calibration_free: tuple[str, ...] = CALIBRATION_FREE
                   ) -> tuple[dict[tuple[str, str], dict], str | None]:
    """The first protocol over ``frames`` ({block: {variant: paired frame}}): the pooled figures per (role,
    variant) and the variant selected on the development pool (on the one development block's own figures when
    there is only one), or None."""
    pooled = {("development", v): f for v, f in pooled_figures(frames, development, rule).items()}
    pooled.update({("held-out", v): f for v, f in pooled_figures(frames, held_out, rule).items()})
    if len(development) > 1:
        dev = {v: f for (r, v), f in pooled.items() if r == "development"}
    elif development:
        dev = {v: rule_figures(df, rule)[0] for v, df in frames.get(development[0], {}).items()}
    else:
        dev = {}
    return pooled, select(dev, rule, calibration_free)


def per_base_protocol(frames: Mapping[str, Mapping[str, pd.DataFrame]], development: list[str], fresh: list[str],
                      rule: Rule = PER_BASE_RULE, calibration_free: tuple[str, ...] = CALIBRATION_FREE
                      ) -> dict[str, dict]:
    """The per-base protocol: per base defense, each variant's cells pooled over the ``development`` blocks and
    over the ``fresh`` held-out ones; the variant selected on development (with every variant's reasons), and the
    confirmation checks of the selected one on the fresh cells. ``{base: {"development": {v: figures}, "fresh":
    {v: figures}, "selected", "checks", "confirmed"}}``."""
    out: dict[str, dict] = {}
    for key, names in (("development", development), ("fresh", fresh)):
        pooled: dict[str, dict[str, list[pd.DataFrame]]] = {}  # base -> variant -> frames
        for b in names:
            for v, df in frames.get(b, {}).items():
                for base, part in by_base(df).items():
                    pooled.setdefault(base, {}).setdefault(v, []).append(part)
        for base, vs in sorted(pooled.items()):
            for v, parts in sorted(vs.items()):
                f, _ = variant_figures(pd.concat(parts, ignore_index=True))
                reasons = rule.reasons(f)
                f["eligible"] = not reasons
                if key == "development":
                    f["not_eligible_because"] = reasons
                out.setdefault(base, {"development": {}, "fresh": {}})[key][v] = f
    for d in out.values():
        d["selected"] = select(d["development"], rule, calibration_free)
        got = d["fresh"].get(d["selected"]) if d["selected"] else None
        d["checks"] = confirm(got, rule.asr_rise_limit) if got else None
        d["confirmed"] = bool(got) and confirmed(d["checks"])
    return out


def shifted_changes(gaps: pd.DataFrame) -> pd.DataFrame:
    """Per victim x base defense, from a report's per-cell gaps: the mean paired change (variant minus uncalibrated)
    of C-Acc and ASR over the shifted sets, in points (``dacc``, ``dasr``)."""
    sh = gaps[~gaps[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    d = sh.assign(dacc=(sh["acc_after_gic"] - sh["acc_after_nogic"]) * 100,
                  dasr=(sh["asr_after_gic"] - sh["asr_after_nogic"]) * 100)
    return d.groupby([Col.ATTACK, Col.BASE_DEFENSE])[["dacc", "dasr"]].mean()
