"""The blocks of a study of GIC variants (issue 16's layout): which spec files run a block's uncalibrated cells
(its ``off`` variant, with a ``role``: development, held-out or confirmation) and which calibrated variants pair
with them (the block's own and those of the files that inherit from it, ``_base_: block.yaml``, variants only), by
construction the same cell ids, checked by :func:`~.spec.pairing_problems`. What the protocols make of their finished
cells is :mod:`backdoorbench_gic.analysis.protocols`'s."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import pandas as pd

from ..config import ConfigError
from .spec import DEFAULT, OFF, MatrixSpec, load_spec, pairing_problems


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
    spec: MatrixSpec
    path: Path
    variants: dict[str, MatrixSpec] = field(default_factory=dict)  # label -> the part storing it
    files: dict[str, Path] = field(default_factory=dict)  # label -> the spec file that declares it


def study_blocks(paths: Iterable[str | Path]) -> dict[str, StudyBlock]:
    """The blocks of the spec files ``paths`` (named by the file that runs their ``off`` variant), in name order.
    A file without ``off`` adds its variants to the nearest file it inherits from that has one. Refused when a
    variant's cells would not pair with its block's (:func:`~.spec.pairing_problems`), a label repeats within a
    block, or a block has no role."""
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


def study_frames(blocks: Mapping[str, StudyBlock]) -> dict[str, dict[str, pd.DataFrame]]:
    """``{block: {variant: paired frame}}`` from the finished cells of ``blocks`` (a block without uncalibrated
    cells, and a variant without calibrated ones, are left out)."""
    from ..analysis.keys import Col
    from ..analysis.protocols import paired_frame
    from .report import collect_results

    frames: dict[str, dict[str, pd.DataFrame]] = {}
    for name, block in blocks.items():
        off = collect_results(block.spec.output_root)
        if off.empty:
            continue
        for v, part in block.variants.items():
            on = off if part.output_root == block.spec.output_root else collect_results(part.output_root)
            if on.empty or on[Col.GIC].astype(bool).sum() == 0:
                continue
            frames.setdefault(name, {})[v] = paired_frame(off, on)
    return frames
