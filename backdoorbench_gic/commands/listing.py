"""``bbgic list``: every registry and what it holds; ``bbgic list NAME``: one component's config keys and defaults.

Listing every registry imports the modules that fill them, torch included (seconds). The rendered listing is
therefore cached under ``$BBGIC_CACHE_DIR/catalog/``, keyed by the content of the package's source files and the
installed entry points of every registry, so a repeated ``bbgic list`` answers without importing torch and a
changed source file or a newly installed plugin is picked up on the next call.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "list", help="list registered models, datasets, attacks, defenses and auxiliary sources, or one's config keys",
        description="`bbgic list` lists every registry; `bbgic list defense` one registry; `bbgic list sau` (or "
                    "`bbgic list defense sau`) the config keys of one component with their types and defaults, and "
                    "with --dataset the values its packaged defense_configs/<name>/<dataset>.yaml sets.")
    p.add_argument("what", nargs="*", metavar="KIND_OR_NAME",
                   help="a registry (model, dataset, attack, defense, aux_source), a component name, or both")
    p.add_argument("--dataset", default=None,
                   help="with a defense name: also show the values of its packaged yaml for this dataset")
    p.add_argument("--refresh", action="store_true", help="rebuild the cached listing (imports every registry)")
    p.set_defaults(func=run)
    return p


def _registries():
    from ..registry import ALL_REGISTRIES

    return ALL_REGISTRIES


def _match_kinds(text: str) -> list:
    return [r for r in _registries() if r.kind.startswith(text.lower().rstrip("s"))]


def run(args: argparse.Namespace) -> int:
    what = list(args.what)
    if len(what) > 2:
        raise ValueError(f"bbgic list takes at most a kind and a name, got {' '.join(what)}")
    if len(what) == 2:
        kinds = _match_kinds(what[0])
        if not kinds:
            raise ValueError(f"no registry called {what[0]!r}; choose from {', '.join(r.kind for r in _registries())}")
        print(describe(what[1], kinds=tuple(r.kind for r in kinds), dataset=args.dataset))
        return 0
    if what and not _match_kinds(what[0]):
        print(describe(what[0], dataset=args.dataset))
        return 0
    tables = catalog(refresh=args.refresh)
    kinds = [r.kind for r in (_match_kinds(what[0]) if what else _registries())]
    print("\n\n".join(tables[k] for k in kinds))
    return 0


# ---------------------------------------------------------------------------------------------------------
# the cached listing
# ---------------------------------------------------------------------------------------------------------
def catalog_key() -> str:
    """A hash of everything the listing depends on: the package's source files (names and bytes), its version, the
    Python version, and each registry's installed entry points (name, target and distribution version)."""
    from .. import __version__

    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"{__version__} {sys.version_info[:2]}".encode())
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    for reg in _registries():
        for ep in sorted(metadata.entry_points(group=reg.entry_point_group), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            h.update(f"{reg.kind}:{ep.name}={ep.value}@{getattr(dist, 'version', '')}".encode())
    return h.hexdigest()[:24]


def _catalog_dir() -> Path:
    from ..utils.cache import cache_dir

    return cache_dir() / "catalog"


def catalog(refresh: bool = False) -> dict[str, str]:
    """``{registry kind: rendered table}``, from the cache when its key matches, else built (importing every
    registry) and cached; a cache that cannot be written is skipped silently."""
    from ..utils.io import atomic_write_json

    path = _catalog_dir() / f"{catalog_key()}.json"
    if not refresh and path.is_file():
        try:
            tables = json.loads(path.read_text(encoding="utf-8"))
            if all(r.kind in tables for r in _registries()):
                return tables
        except (OSError, ValueError):
            pass
    tables = {r.kind: r.table() for r in _registries()}
    try:
        atomic_write_json(path, tables)
        for old in path.parent.glob("*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass
    return tables


# ---------------------------------------------------------------------------------------------------------
# one component's config keys
# ---------------------------------------------------------------------------------------------------------
def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def config_rows(cls: type, packaged: dict[str, Any] | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """(own keys, common keys) of a config dataclass as [key, type, default(, packaged value)] rows. Own keys are
    those the class adds to BackdoorBench's common :class:`~backdoorbench_gic.config.RunConfig` keys or whose
    default it changes; keys starting with ``_`` are internal and left out."""
    import typing

    from ..config import RunConfig, _type_name

    common = {f.name: _default(f) for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(cls)
    own, shared = [], []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = _default(f)
        row = [f.name, _type_name(hints.get(f.name, Any)), _show(default)]
        if packaged is not None:
            row.append(_show(packaged[f.name]) if f.name in packaged else "")
        (shared if f.name in common and common[f.name] == default else own).append(row)
    return own, shared


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def describe(name: str, kinds: Iterable[str] | None = None, dataset: str | None = None) -> str:
    """What ``bbgic list NAME`` prints: the component's kind, aliases and description, and for a component with
    a config dataclass (defenses, attacks) every key with its type and default, own keys first."""
    from ..config import default_yaml_for, read_yaml
    from ..registry import UnknownNameError
    from ..resources import defense_configs_dir

    regs = [r for r in _registries() if kinds is None or r.kind in tuple(kinds)]
    found = [r for r in regs if name in r]
    if not found:
        if len(regs) == 1:
            regs[0].resolve(name)  # raises with the known names and close matches
        known = "; ".join(f"{r.kind}s: {', '.join(r.names())}" for r in regs)
        raise UnknownNameError(f"no component called {name!r}. Known {known}")
    out = []
    for reg in found:
        canonical = reg.resolve(name)
        obj = reg.get(canonical)
        aliases = reg.aliases_of(canonical)
        out.append(f"{reg.kind} {canonical}" + (f" (aliases: {', '.join(aliases)})" if aliases else ""))
        doc = (getattr(obj, "__doc__", None) or "").strip()
        if doc:
            out += ["  " + line.strip() for line in doc.split("\n\n")[0].splitlines()]
        cls = getattr(obj, "config_class", None)
        if reg.kind == "aux_source":
            out += _aux_source_lines(canonical, obj)
            continue
        if cls is None or not dataclasses.is_dataclass(cls):
            out.append("  (no config keys)")
            continue
        packaged, yaml_note = None, ""
        folder = defense_configs_dir() / canonical
        if reg.kind == "defense" and folder.is_dir():
            if dataset:
                path = default_yaml_for(canonical, dataset)
                packaged = read_yaml(path) if path is not None else {}
                yaml_note = (f"packaged yaml for {dataset}: {path}" if path is not None
                             else f"no packaged yaml for {dataset} in {folder}")
            else:
                names = sorted(p.stem for p in folder.glob("*.yaml"))
                yaml_note = (f"packaged yamls (they override the defaults; see them with --dataset DS): "
                             f"{folder}/{{{','.join(names)}}}.yaml")
        header = ["key", "type", "default"] + ([f"{dataset}.yaml"] if packaged is not None else [])
        own, shared = config_rows(cls, packaged)
        out.append("")
        out.append(f"  config keys of {cls.__name__} (give any as --key value or in a --yaml_path file):")
        if own:
            out += _table(header, own)
        if shared:
            out.append("")
            out.append("  common BackdoorBench keys (shared by every component):")
            out += _table(header, shared)
        if "base" in {f.name for f in dataclasses.fields(cls)}:
            out += ["", "  it also takes every key of its base defense (bbgic list <base>), e.g. --base sau --adv_steps 5"]
        if yaml_note:
            out += ["", f"  {yaml_note}"]
        out.append("")
    return "\n".join(out).rstrip()


def _aux_source_lines(name: str, fn: Any) -> list[str]:
    """An auxiliary source's built-in arguments (``external:fonts``) and the options it accepts."""
    from ..auxdata.base import source_options

    out = []
    builtins = getattr(fn, "aux_builtins", {})
    if builtins:
        out += ["", "  built in:"] + [f"    {name}:{arg}: {line}" for arg, line in builtins.items()]
    options = source_options(fn)
    if options:
        out += ["", "  options (--aux_option KEY=VALUE; aux_options in a matrix spec):"]
        out += _table(["option", "default", "what it does"], [[k, _show(d), h] for k, (d, h) in sorted(options.items())])
    return out
