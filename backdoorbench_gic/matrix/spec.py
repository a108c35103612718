"""The matrix run specification: a YAML file naming attacks, defenses, auxiliary types, sizes, seeds and
with/without GIC, validated up front so no GPU time is spent on a spec that cannot finish.

```yaml
name: fmnist-small
output_root: runs/fmnist-small        # relative paths are relative to the spec file
bb_root: .                            # BackdoorBench root holding record/ (and data/)
attacks:
  - record: badnet_fm                 # an existing record/<name>/attack_result.pt ...
  - record: blended_fm                # ... or one generated (once) from attack settings when missing
    generate: {attack: blended, dataset: fashion-mnist_split_5_seed_0, model: preactresnet18, width: 16, epochs: 3}
defenses:
  - ft
  - {name: sau, overrides: {n_rounds: 3}}
aux: [reserved, reserved_noise]
aux_sizes: [{ratio: 0.05}, {n_per_class: 20}]   # optional; default: the defense config's ratio
seeds: [0, 1]
gic: [false, true]                    # optional; true wraps each defense in GIC (gic with base=<defense>)
defaults: {device: cpu}               # config keys for every defense (per-defense overrides win)
gic_overrides: {}                     # config keys for the GIC wrapper
aux_options: {}                       # auxiliary-source options for every cell (e.g. inversion_steps: 50)
aux_options_for: {}                   # per auxiliary type, over aux_options: {reserved_noise: {shift_base: train}}
eval_limit: null                      # CPU-scale runs: a fixed subset of N clean and N poisoned test images
monitor_every: 0                      # per-epoch test evaluation for the CSVs (0: final only)
executor: {kind: local, workers: 1}   # or {kind: ray, address: auto, num_cpus: 1, num_gpus: 0}
role: development                     # optional: development, held-out or confirmation (what a study may read it for)
probes: [refresh, retune]             # optional: post-purification probes on every cell (ASR-refresh, P-ASR)
probe_options: {}                     # probe settings (probes.py), e.g. {retune: {epochs: 5}}
```

**GIC variants.** ``gic`` is an axis of named variants, each ``null`` (uncalibrated) or GIC's config keys over
``gic_overrides``; ``gic: [false, true]`` is shorthand for ``{off: null, default: {}}``::

    gic: {off: null, default: {}, bn-after: {placement: bn-after}, before+generator: {family: generator}}

``off`` and ``default`` live in ``output_root`` as they always have; every other variant V is a matrix of its own,
``<name>-V`` in ``<output_root>-V`` (:meth:`MatrixSpec.parts`). A variant's cell therefore has the id of its
``default`` twin, and its uncalibrated partner is the ``off`` cell of the same coordinates in ``output_root``
(:meth:`Cell.uncalibrated`): pairs differ in GIC alone by construction, and adding a variant never touches a
finished cell.

**Inheritance.** ``_base_: other.yaml`` (or a list; relative to the file) starts from another spec and overrides
its keys, as mmengine does: mappings merge key by key, anything else (lists included) is replaced, and
``_delete_: true`` inside a mapping replaces the base's mapping instead of merging into it. A path a file writes
(``output_root``, ``bb_root``) stays relative to that file. Cycles are refused.

**Probes.** ``probes`` runs the post-purification probes (:mod:`backdoorbench_gic.probes`: ``refresh`` for
ASR-refresh, ``retune`` for P-ASR and its clean control) on every cell after its purification; ``probe_options`` sets
them (``{retune: {epochs: 5}}`` or dotted ``{retune.epochs: 5}``). Probes run after the purified model is final and
on copies of it, so they change none of a cell's defense numbers: they are not part of a cell's identity, and a
cell with probes pairs with its uncalibrated twin as before. A cell finished before ``probes`` was added keeps its
row without them; the runner names such cells (use a new ``output_root``, or delete those cells, to probe them).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from ..config import ConfigError

if TYPE_CHECKING:
    from ..pipeline import DefenseRequest

ROLES = ("development", "held-out", "confirmation")  # what a study may read a spec's cells for
OFF, DEFAULT = "off", "default"  # the shorthand's variants: gic false and true, stored in the spec's own folder
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_PATH_KEYS = ("output_root", "bb_root")


@dataclass(frozen=True)
class AttackEntry:
    record: str
    generate: dict[str, Any] | None = None


@dataclass(frozen=True)
class DefenseEntry:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    display: str | None = None  # the name tables use; set by parse_spec (a user 'label', else the name)

    @property
    def label(self) -> str:
        """Folder-safe name; a hash of the overrides keeps differently configured entries apart, so changing
        an entry's overrides never reuses results computed with the old ones."""
        if not self.overrides:
            return self.name
        h = hashlib.sha1(json.dumps(self.overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"{self.name}-{h}"

    @property
    def shown(self) -> str:
        return self.display or self.name


@dataclass(frozen=True)
class AuxSize:
    ratio: float | None = None
    n_per_class: int | None = None

    @property
    def label(self) -> str:
        if self.n_per_class is not None:
            return f"n{self.n_per_class}"
        if self.ratio is not None:
            return f"r{self.ratio:g}"
        return "default"


@dataclass(frozen=True)
class Cell:
    """One purification run of the matrix.

    ``gic_settings`` are GIC's config keys for a calibrated cell (the spec's ``gic_overrides`` under its variant's);
    ``variant`` names the variant. Neither is part of the identity: a variant other than the spec's ``default``
    is stored in a folder of its own (:meth:`MatrixSpec.parts`), so cell ids written before variants existed stay
    valid and a variant's cell shares its ``default`` twin's id."""

    attack: str
    defense: DefenseEntry
    aux: str
    size: AuxSize
    seed: int
    gic: bool
    gic_settings: Mapping[str, Any] = field(default_factory=dict)
    variant: str = ""

    @property
    def identity(self) -> dict[str, Any]:
        return {"attack": self.attack, "defense": self.defense.name, "overrides": self.defense.overrides,
                "aux": self.aux, "ratio": self.size.ratio, "n_per_class": self.size.n_per_class, "seed": self.seed,
                "gic": self.gic}

    @property
    def cell_id(self) -> str:
        return hashlib.sha1(json.dumps(self.identity, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def relpath(self) -> Path:
        defense = self.defense.label + ("+gic" if self.gic else "")
        aux = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in self.aux)
        return Path("cells") / self.attack / defense / f"{aux}@{self.size.label}" / f"seed{self.seed}"

    def describe(self) -> str:
        gic = f"+gic[{self.variant}]" if self.gic and self.variant not in ("", DEFAULT) else "+gic" if self.gic else ""
        return f"{self.attack} | {self.defense.label}{gic} | {self.aux}@{self.size.label} | seed {self.seed}"

    def uncalibrated(self) -> "Cell":
        """The cell this one pairs with: the same coordinates without GIC (stored in the spec's own folder)."""
        return dataclasses.replace(self, gic=False, gic_settings={}, variant=OFF)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a worker's payload); :meth:`from_dict` inverts it."""
        return {"attack": self.attack, "defense": self.defense.name, "overrides": self.defense.overrides,
                "display": self.defense.display, "aux": self.aux, "ratio": self.size.ratio,
                "n_per_class": self.size.n_per_class, "seed": self.seed, "gic": self.gic,
                "gic_settings": dict(self.gic_settings), "variant": self.variant}

    @classmethod
    def from_dict(cls, c: Mapping[str, Any]) -> "Cell":
        return cls(c["attack"], DefenseEntry(c["defense"], dict(c["overrides"]), c.get("display")), c["aux"],
                   AuxSize(c["ratio"], c["n_per_class"]), int(c["seed"]), bool(c["gic"]),
                   dict(c.get("gic_settings") or {}), str(c.get("variant", "")))

    def request(self, spec: "MatrixSpec | Mapping[str, Any]", output_dir: str | Path | None = None) -> "DefenseRequest":
        """The defense run this cell is, under ``spec`` (the part that stores it, or its :meth:`MatrixSpec.to_dict`):
        what a worker runs, and what a benchmark replays to rebuild a finished cell's defense or auxiliary draw.
        The defense's overrides are the spec's ``defaults`` under the entry's own, with the seed, the auxiliary
        type and the ratio; a calibrated cell runs ``gic`` with its settings under those and ``base`` set."""
        from ..pipeline import DefenseRequest
        from ..registry import DEFENSES

        sd = spec.to_dict() if isinstance(spec, MatrixSpec) else spec
        overrides: dict[str, Any] = {**(sd.get("defaults") or {}), **self.defense.overrides,
                                     "random_seed": self.seed, "reserved_type": self.aux}
        if self.size.ratio is not None:
            overrides["ratio"] = self.size.ratio
        base = DEFENSES.resolve(self.defense.name)
        defense = self.defense.name
        if self.gic:
            overrides = {**self.gic_settings, **overrides, "base": base}
            defense = "gic"
        return DefenseRequest(
            result_file=self.attack, defense=defense, bb_root=str(sd["bb_root"]), overrides=overrides,
            output_dir=None if output_dir is None else str(output_dir), n_per_class=self.size.n_per_class,
            monitor_every=int(sd.get("monitor_every", 0)),
            aux_options={**(sd.get("aux_options") or {}), **((sd.get("aux_options_for") or {}).get(self.aux) or {})},
            eval_limit=sd.get("eval_limit"), trust_checkpoint=bool(sd.get("trust_checkpoint", False)), progress=False,
            probes=list(sd.get("probes") or []), probe_options=dict(sd.get("probe_options") or {}),
            extra_row={"cell_id": self.cell_id, "gic": self.gic, "defense_label": self.defense.shown,
                       "base_defense": base, "aux_size_label": self.size.label, "matrix": sd.get("name", "")},
        )


@dataclass
class MatrixSpec:
    name: str
    path: Path | None
    output_root: Path
    bb_root: Path
    attacks: list[AttackEntry]
    defenses: list[DefenseEntry]
    aux: list[str]
    aux_sizes: list[AuxSize]
    seeds: list[int]
    variants: dict[str, dict[str, Any] | None]  # the GIC axis: name -> None (uncalibrated) or GIC keys
    defaults: dict[str, Any] = field(default_factory=dict)
    gic_overrides: dict[str, Any] = field(default_factory=dict)
    aux_options: dict[str, Any] = field(default_factory=dict)
    aux_options_for: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_limit: int | None = None
    monitor_every: int = 0
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "local", "workers": 1})
    trust_checkpoint: bool = False
    role: str | None = None
    bases: list[Path] = field(default_factory=list)  # the spec files it inherits from (``_base_``), nearest first
    variant: str | None = None  # set on a part (:meth:`parts`): the variant of the spec it was split from
    probes: list[str] = field(default_factory=list)  # post-purification probes of every cell (probes.py)
    probe_options: dict[str, Any] = field(default_factory=dict)

    @property
    def gic(self) -> list[bool]:
        """With or without GIC, per variant (the shorthand's view of the axis)."""
        return [s is not None for s in self.variants.values()]

    def cells(self) -> list[Cell]:
        """Seed-major order: a run cut short (or still going) holds whole seeds of the full design, so its
        paired with/without-GIC comparisons are usable at any point."""
        return [Cell(a.record, d, x, s, seed, g is not None, {} if g is None else {**self.gic_overrides, **g},
                     self.variant or v)
                for seed, a, d, x, s, (v, g) in
                itertools.product(self.seeds, self.attacks, self.defenses, self.aux, self.aux_sizes,
                                  self.variants.items())]

    def parts(self) -> list["MatrixSpec"]:
        """The matrices the spec stores, each in one folder: ``off`` and ``default`` in ``output_root``; every other
        variant V as ``<name>-V`` in ``<output_root>-V``, running V's settings as that matrix's GIC default (so
        its ``spec.yaml`` reads as the shorthand). A spec without other variants is its own only part."""
        own = {v: g for v, g in self.variants.items() if v in (OFF, DEFAULT) or self.variant}
        if len(own) == len(self.variants):
            return [self]
        out = [dataclasses.replace(self, variants=own)] if own else []
        for v, g in self.variants.items():
            if v not in own:
                out.append(dataclasses.replace(
                    self, name=f"{self.name}-{v}", output_root=self.output_root.with_name(f"{self.output_root.name}-{v}"),
                    variants={DEFAULT: {}}, gic_overrides={**self.gic_overrides, **(g or {})}, variant=v))
        return out

    def part(self, variant: str) -> "MatrixSpec":
        """The part that stores ``variant``'s cells."""
        variant = variant or DEFAULT
        for p in self.parts():
            if variant in p.variants or p.variant == variant:
                return p
        raise KeyError(f"matrix spec {self.name!r} has no GIC variant {variant!r}; it has {', '.join(self.variants)}")

    def cell_of(self, row: Mapping[str, Any]) -> Cell:
        """The cell a finished row (``result.json``) came from, found by its matrix name and cell id."""
        for p in self.parts():
            if row.get("matrix", p.name) == p.name:
                for c in p.cells():
                    if c.cell_id == row["cell_id"]:
                        return c
        raise KeyError(f"no cell {row.get('cell_id')!r} of matrix {row.get('matrix')!r} in spec {self.name!r}: the row "
                       "comes from another spec, or the spec changed since it ran")

    def to_dict(self) -> dict[str, Any]:
        shorthand = all((v, g) in ((OFF, None), (DEFAULT, {})) for v, g in self.variants.items())
        return {
            "name": self.name, "output_root": str(self.output_root), "bb_root": str(self.bb_root),
            "attacks": [{"record": a.record, **({"generate": a.generate} if a.generate else {})} for a in self.attacks],
            "defenses": [{"name": d.name, "overrides": d.overrides, **({"label": d.display} if d.display else {})}
                         for d in self.defenses],
            "aux": self.aux, "aux_sizes": [{"ratio": s.ratio, "n_per_class": s.n_per_class} for s in self.aux_sizes],
            "seeds": self.seeds, "gic": self.gic if shorthand else dict(self.variants), "defaults": self.defaults,
            "gic_overrides": self.gic_overrides, "aux_options": self.aux_options,
            "aux_options_for": self.aux_options_for, "eval_limit": self.eval_limit,
            "monitor_every": self.monitor_every, "executor": self.executor, "trust_checkpoint": self.trust_checkpoint,
            **({"role": self.role} if self.role else {}),
            **({"probes": self.probes, "probe_options": self.probe_options} if self.probes else {}),
        }


_TOP_KEYS = {"name", "output_root", "bb_root", "attacks", "defenses", "aux", "aux_sizes", "seeds", "gic", "defaults",
             "gic_overrides", "aux_options", "aux_options_for", "eval_limit", "monitor_every", "executor",
             "trust_checkpoint", "role", "probes", "probe_options"}


def _variants(value: Any, where: str) -> dict[str, dict[str, Any] | None]:
    """The GIC axis from ``gic``: the shorthand (``true``, ``false`` or a list of them) or a mapping of named
    variants, each ``null`` (only ``off``) or a mapping of GIC keys."""
    if isinstance(value, bool):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(g, bool) for g in value):
            raise ConfigError(f"{where}: gic must be true, false, a list of them, or a mapping of named variants "
                              f"({{off: null, default: {{}}, bn-after: {{placement: bn-after}}}}), got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: the spec lists the same cell twice (gic lists {value!r})")
        return {DEFAULT if g else OFF: {} if g else None for g in value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: gic must be true, false, a list of them, or a mapping of named variants, "
                          f"got {value!r}")
    out: dict[str, dict[str, Any] | None] = {}
    for name, settings in value.items():
        name = OFF if name is False else name  # YAML 1.1 (PyYAML) reads a bare `off:` key as false
        if not isinstance(name, str) or not _VARIANT_NAME.match(name):
            raise ConfigError(f"{where}: GIC variant name {name!r} must be letters, digits and -_.+ (it names a folder)")
        if (settings is None) != (name == OFF):
            raise ConfigError(f"{where}: gic.{name}: " + ("'off' is the uncalibrated variant; write off: null"
                                                           if name == OFF else "null is only for the uncalibrated "
                                                           "variant, named off; give a mapping of GIC keys ({} for GIC's "
                                                           "defaults)"))
        if settings is not None and not isinstance(settings, dict):
            raise ConfigError(f"{where}: gic.{name} must be a mapping of GIC config keys, got {settings!r}")
        out[name] = None if settings is None else dict(settings)
    return out


def _as_list(value: Any, key: str, where: str) -> list:
    if value is None:
        raise ConfigError(f"{where}: '{key}' is required")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list, got {value!r}")
    return value


def parse_spec(data: dict[str, Any], base_dir: Path | None = None, where: str = "matrix spec") -> MatrixSpec:
    """Structure and types only; :func:`validate_spec` checks names against registries and records on disk."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    if "_base_" in data:
        raise ConfigError(f"{where}: _base_ names a spec file relative to the file that writes it; load the spec "
                          "with load_spec(path)")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_TOP_KEYS))}")
    base = base_dir or Path.cwd()

    def path_of(key: str, default: str) -> Path:
        p = Path(str(data.get(key, default)))
        return (p if p.is_absolute() else base / p).resolve()

    attacks = []
    for i, a in enumerate(_as_list(data.get("attacks"), "attacks", where)):
        if isinstance(a, str):
            a = {"record": a}
        if not isinstance(a, dict) or "record" not in a or set(a) - {"record", "generate"}:
            raise ConfigError(f"{where}: attacks[{i}] must be a record name or {{record: NAME, generate: {{...}}}}, got {a!r}")
        gen = a.get("generate")
        if gen is not None and not isinstance(gen, dict):
            raise ConfigError(f"{where}: attacks[{i}].generate must be a mapping of attack settings")
        attacks.append(AttackEntry(str(a["record"]), gen))
    defenses = []
    for i, d in enumerate(_as_list(data.get("defenses"), "defenses", where)):
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict) or "name" not in d or set(d) - {"name", "overrides", "label"}:
            raise ConfigError(f"{where}: defenses[{i}] must be a name or {{name: NAME, label: SHOWN AS, overrides: "
                              f"{{...}}}}, got {d!r}")
        overrides = d.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: defenses[{i}].overrides must be a mapping")
        defenses.append(DefenseEntry(str(d["name"]), dict(overrides), d.get("label")))
    names = [d.name for d in defenses]
    defenses = [d if d.display or names.count(d.name) == 1 else DefenseEntry(d.name, d.overrides, d.label)
                for d in defenses]
    shown = [d.shown for d in defenses]
    if len(set(shown)) != len(shown):
        raise ConfigError(f"{where}: two defense entries would share the name {sorted(s for s in shown if shown.count(s) > 1)[0]!r} "
                          "in the tables; give them distinct 'label' keys")
    aux = [str(x) for x in _as_list(data.get("aux"), "aux", where)]
    sizes = []
    for i, s in enumerate(data.get("aux_sizes") or [{}]):
        if not isinstance(s, dict) or set(s) - {"ratio", "n_per_class"}:
            raise ConfigError(f"{where}: aux_sizes[{i}] must be {{ratio: R}} or {{n_per_class: N}}, got {s!r}")
        if s.get("ratio") is not None and s.get("n_per_class") is not None:
            raise ConfigError(f"{where}: aux_sizes[{i}] gives both ratio and n_per_class; pick one")
        ratio = float(s["ratio"]) if s.get("ratio") is not None else None
        npc = int(s["n_per_class"]) if s.get("n_per_class") is not None else None
        if ratio is not None and not 0 < ratio <= 1:
            raise ConfigError(f"{where}: aux_sizes[{i}].ratio must be in (0, 1], got {ratio}")
        if npc is not None and npc < 1:
            raise ConfigError(f"{where}: aux_sizes[{i}].n_per_class must be >= 1, got {npc}")
        sizes.append(AuxSize(ratio, npc))
    try:
        seeds = [int(s) for s in _as_list(data.get("seeds", [0]), "seeds", where)]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: seeds must be integers, got {data.get('seeds')!r}") from None
    variants = _variants(data.get("gic", [False]), where)
    role = data.get("role")
    if role is not None and role not in ROLES:
        raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)} (or left out), got {role!r}")
    executor = data.get("executor") or {"kind": "local", "workers": 1}
    if not isinstance(executor, dict) or executor.get("kind", "local") not in ("local", "ray"):
        raise ConfigError(f"{where}: executor.kind must be 'local' or 'ray', got {executor!r}")
    eval_limit = data.get("eval_limit")
    if eval_limit is not None and (isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1):
        raise ConfigError(f"{where}: eval_limit must be a positive number of test images or null, got {eval_limit!r}")
    for key in ("defaults", "gic_overrides", "aux_options", "aux_options_for"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping of config keys")
    per_type = dict(data.get("aux_options_for") or {})
    for name, opts in per_type.items():
        if name not in aux:
            raise ConfigError(f"{where}: aux_options_for names {name!r}, which is not in aux {aux}")
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: aux_options_for.{name} must be a mapping of source options")
    from ..probes import ProbeSettings, parse_probes

    try:
        probes = parse_probes(data.get("probes") or [])
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: probes must be a list of refresh and/or retune ({exc})") from None
    if not isinstance(data.get("probe_options") or {}, dict):
        raise ConfigError(f"{where}: 'probe_options' must be a mapping of probe settings")
    ProbeSettings.from_dict(data.get("probe_options") or {}, source=f"{where}: probe_options")
    if data.get("probe_options") and not probes:
        raise ConfigError(f"{where}: probe_options given without probes to use them; add probes: [refresh, retune]")
    spec = MatrixSpec(
        name=str(data.get("name", "matrix")), path=None, output_root=path_of("output_root", "runs/matrix"),
        bb_root=path_of("bb_root", "."), attacks=attacks, defenses=defenses, aux=aux, aux_sizes=sizes, seeds=seeds,
        variants=variants, defaults=dict(data.get("defaults") or {}),
        gic_overrides=dict(data.get("gic_overrides") or {}),
        aux_options=dict(data.get("aux_options") or {}), aux_options_for=per_type, eval_limit=eval_limit,
        monitor_every=int(data.get("monitor_every", 0)), executor=dict(executor),
        trust_checkpoint=bool(data.get("trust_checkpoint", False)), role=role, probes=probes,
        probe_options=dict(data.get("probe_options") or {}),
    )
    for part in spec.parts():
        ids = [c.cell_id for c in part.cells()]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{where}: the spec lists the same cell twice (duplicate attacks, defenses, aux types "
                              "or seeds)")
    return spec


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """mmengine's merge: ``over``'s mappings merge into ``base``'s key by key, anything else replaces;
    ``_delete_: true`` in a mapping replaces the base's mapping instead."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict):
            fresh = v.get("_delete_", False) or not isinstance(out.get(k), dict)
            out[k] = _merge({} if fresh else out[k], {kk: vv for kk, vv in v.items() if kk != "_delete_"})
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_spec_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """A spec file's settings with its ``_base_`` files merged under them (see the module's notes) and the files
    it inherited from, nearest first. Paths a file writes are made absolute against that file's folder."""
    path = Path(path).resolve()
    if path in _chain:
        loop = " -> ".join(p.name for p in (*_chain[_chain.index(path):], path))
        raise ConfigError(f"{_chain[-1]}: _base_ inheritance loops ({loop}); a spec may not inherit from itself")
    if not path.is_file():
        raise FileNotFoundError(f"matrix spec {path} does not exist" + (f" (named by _base_ in {_chain[-1]})"
                                                                           if _chain else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key in _PATH_KEYS:
        if key in data and not Path(str(data[key])).is_absolute():
            data[key] = str((path.parent / str(data[key])).resolve())
    base = data.pop("_base_", None)
    if base is None:
        return data, []
    names = [base] if isinstance(base, str) else base
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: _base_ must name a spec file (or a list of them) relative to this one, got {base!r}")
    merged: dict[str, Any] = {}
    chain: list[Path] = []
    for name in names:
        got, inherited = read_spec_file(path.parent / name, (*_chain, path))
        merged = _merge(merged, got)
        chain += [(path.parent / name).resolve(), *inherited]
    return _merge(merged, data), chain


def load_spec(path: str | Path) -> MatrixSpec:
    path = Path(path)
    data, bases = read_spec_file(path)
    spec = parse_spec(data, base_dir=path.parent.resolve(), where=str(path))
    spec.path = path.resolve()
    spec.bases = bases
    return spec


def validate_spec(spec: MatrixSpec) -> list[str]:
    """Check every name against the registries, every defense config (with its overrides), and every record
    that is not generated; returns the problems (empty when the spec can run). Nothing is trained."""
    from ..registry import DEFENSES, UnknownNameError
    from ..records import load_attack_record

    problems: list[str] = []
    datasets: dict[str, str] = {}
    loaded: dict[str, Any] = {}  # records on disk, to check each auxiliary type against (a folder type's folder)
    for a in spec.attacks:
        record_dir = spec.bb_root / "record" / a.record
        if (record_dir / "attack_result.pt").is_file():
            try:
                rec = load_attack_record(record_dir, spec.bb_root, trust=spec.trust_checkpoint)
                missing = rec.missing_pngs("bd_test")
                if missing:
                    problems.append(f"record {a.record}: {len(missing)} bd_test PNGs missing (first {missing[0]})")
                rec.dataset().locate()
                datasets[a.record] = rec.clean_data
                loaded[a.record] = rec
            except Exception as exc:
                problems.append(f"record {a.record}: {type(exc).__name__}: {exc}")
        elif a.generate is None:
            problems.append(f"record {a.record}: no {record_dir / 'attack_result.pt'} and no 'generate' settings to make it")
        else:
            try:
                from ..attacks import build_attack

                cfg = build_attack({**a.generate, "save_folder_name": a.record}).config
                datasets[a.record] = cfg.dataset
            except Exception as exc:  # unknown attack name, unknown key, bad value: say which
                problems.append(f"attacks[{a.record}].generate: {exc}")
    for d in spec.defenses:
        try:
            cls = DEFENSES.get(d.name)
        except UnknownNameError as exc:
            problems.append(f"defense {d.name!r}: {exc}")
            continue
        for ds in sorted(set(datasets.values())) or [None]:
            for v, g in spec.variants.items():
                try:
                    # built exactly as a cell builds it, so GIC's key routing (its own keys to GIC, the base's to
                    # the base) and both configs' validation apply here too
                    overrides = {**spec.defaults, **d.overrides}
                    if g is not None:
                        DEFENSES.get("gic").from_sources(
                            ds or None, None, {**spec.gic_overrides, **g, **overrides,
                                               "base": DEFENSES.resolve(d.name)}, name="gic")
                    else:
                        cls.from_sources(ds or None, None, overrides, name=DEFENSES.resolve(d.name))
                except Exception as exc:
                    with_gic = "" if g is None else " with GIC" + ("" if v == DEFAULT else f" ({v})")
                    problems.append(f"defense {d.label}{with_gic} on {ds}: {exc}")
    from ..auxdata import check_aux_request, parse_reserved_type

    for x in spec.aux:
        try:
            parse_reserved_type(x)
            for name, rec in loaded.items():
                try:
                    check_aux_request(rec, x)
                except Exception as exc:
                    problems.append(f"aux {x!r} for record {name}: {exc}")
        except Exception as exc:
            problems.append(f"aux {x!r}: {exc}")
    return problems


def uncalibrated_source(spec: MatrixSpec) -> MatrixSpec:
    """The spec whose ``off`` cells pair with ``spec``'s calibrated ones: ``spec`` itself when it runs them, else the
    nearest file it inherits from that does (a file of variants only, ``_base_: block.yaml``)."""
    if OFF in spec.variants:
        return spec
    for path in spec.bases:
        base = load_spec(path)
        if OFF in base.variants:
            return base
    raise ConfigError(f"{spec.path or spec.name}: no uncalibrated (off) variant here or in the files it inherits "
                      "from, so its calibrated cells pair with nothing")


def pairing_problems(spec: MatrixSpec, base: MatrixSpec) -> list[str]:
    """Why ``spec``'s calibrated cells would not pair with ``base``'s uncalibrated ones (empty: each has a twin in
    ``base``, the cell of the same id, whose request differs from its own in GIC alone)."""
    off = {c.cell_id: c.request(base) for c in base.cells() if not c.gic}
    problems = []
    for part in spec.parts():
        for cell in (c for c in part.cells() if c.gic):
            twin = cell.uncalibrated()
            got, want = off.get(twin.cell_id), twin.request(part)
            if got is None:
                problems.append(f"{cell.describe()}: {base.name} runs no uncalibrated twin of it (cell {twin.cell_id})")
                continue
            differ = [k for k in ("result_file", "bb_root", "overrides", "n_per_class", "aux_options", "eval_limit",
                                  "monitor_every", "trust_checkpoint") if getattr(got, k) != getattr(want, k)]
            if differ:
                problems.append(f"{cell.describe()}: its uncalibrated twin in {base.name} differs in {', '.join(differ)}")
    return problems
