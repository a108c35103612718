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
```
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError


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
    """One purification run of the matrix."""

    attack: str
    defense: DefenseEntry
    aux: str
    size: AuxSize
    seed: int
    gic: bool

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
        return f"{self.attack} | {self.defense.label}{'+gic' if self.gic else ''} | {self.aux}@{self.size.label} | seed {self.seed}"


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
    gic: list[bool]
    defaults: dict[str, Any] = field(default_factory=dict)
    gic_overrides: dict[str, Any] = field(default_factory=dict)
    aux_options: dict[str, Any] = field(default_factory=dict)
    aux_options_for: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_limit: int | None = None
    monitor_every: int = 0
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "local", "workers": 1})
    trust_checkpoint: bool = False

    def cells(self) -> list[Cell]:
        """Seed-major order: a run cut short (or still going) holds whole seeds of the full design, so its
        paired with/without-GIC comparisons are usable at any point."""
        return [Cell(a.record, d, x, s, seed, g) for seed, a, d, x, s, g in
                itertools.product(self.seeds, self.attacks, self.defenses, self.aux, self.aux_sizes, self.gic)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "output_root": str(self.output_root), "bb_root": str(self.bb_root),
            "attacks": [{"record": a.record, **({"generate": a.generate} if a.generate else {})} for a in self.attacks],
            "defenses": [{"name": d.name, "overrides": d.overrides, **({"label": d.display} if d.display else {})}
                         for d in self.defenses],
            "aux": self.aux, "aux_sizes": [{"ratio": s.ratio, "n_per_class": s.n_per_class} for s in self.aux_sizes],
            "seeds": self.seeds, "gic": self.gic, "defaults": self.defaults, "gic_overrides": self.gic_overrides,
            "aux_options": self.aux_options, "aux_options_for": self.aux_options_for, "eval_limit": self.eval_limit,
            "monitor_every": self.monitor_every, "executor": self.executor, "trust_checkpoint": self.trust_checkpoint,
        }


_TOP_KEYS = {"name", "output_root", "bb_root", "attacks", "defenses", "aux", "aux_sizes", "seeds", "gic", "defaults",
             "gic_overrides", "aux_options", "aux_options_for", "eval_limit", "monitor_every", "executor", "trust_checkpoint"}


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
    gic = data.get("gic", [False])
    gic = [gic] if isinstance(gic, bool) else gic
    if not isinstance(gic, list) or not all(isinstance(g, bool) for g in gic):
        raise ConfigError(f"{where}: gic must be true, false or a list of them, got {gic!r}")
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
    spec = MatrixSpec(
        name=str(data.get("name", "matrix")), path=None, output_root=path_of("output_root", "runs/matrix"),
        bb_root=path_of("bb_root", "."), attacks=attacks, defenses=defenses, aux=aux, aux_sizes=sizes, seeds=seeds,
        gic=list(gic), defaults=dict(data.get("defaults") or {}), gic_overrides=dict(data.get("gic_overrides") or {}),
        aux_options=dict(data.get("aux_options") or {}), aux_options_for=per_type, eval_limit=eval_limit,
        monitor_every=int(data.get("monitor_every", 0)), executor=dict(executor),
        trust_checkpoint=bool(data.get("trust_checkpoint", False)),
    )
    ids = [c.cell_id for c in spec.cells()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: the spec lists the same cell twice (duplicate attacks, defenses, aux types or seeds)")
    return spec


def load_spec(path: str | Path) -> MatrixSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matrix spec {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    spec = parse_spec(data, base_dir=path.parent.resolve(), where=str(path))
    spec.path = path.resolve()
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
            for gic in spec.gic:
                try:
                    # built exactly as a cell builds it, so GIC's key routing (its own keys to GIC, the base's to
                    # the base) and both configs' validation apply here too
                    overrides = {**spec.defaults, **d.overrides}
                    if gic:
                        DEFENSES.get("gic").from_sources(
                            ds or None, None, {**spec.gic_overrides, **overrides, "base": DEFENSES.resolve(d.name)},
                            name="gic")
                    else:
                        cls.from_sources(ds or None, None, overrides, name=DEFENSES.resolve(d.name))
                except Exception as exc:
                    problems.append(f"defense {d.label}{' with GIC' if gic else ''} on {ds}: {exc}")
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
