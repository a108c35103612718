"""One small name -> builder registry for models, datasets, attacks, defenses and auxiliary sources.

Registration is one decorator, discovery is one call (``names()``), and building goes from a plain name or a
``{"type": name, **kwargs}`` dict, so YAML files, the CLI and the matrix runner construct components the same
way. Third-party packages add entries through the entry-point group ``backdoorbench_gic.<kind>``; those and
our own modules are imported lazily, on the first lookup.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


class UnknownNameError(KeyError):
    """A name that no registry entry or alias matches; the message lists what is known."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0])


def transpositions(word: str) -> set[str]:
    """``word`` with two neighbouring characters swapped, each way (``fts`` -> ``tfs``, ``fst``)."""
    return {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)} - {word}


def suggestions(key: str, known: Iterable[str], n: int = 3) -> list[str]:
    """What ``key`` may have meant: names one transposition away first (``fts`` -> ``fst``; difflib ranks those
    below names that merely share a prefix), then difflib's closest matches; at most ``n`` plus the
    transpositions."""
    known = list(known)
    swapped = [k for k in known if k in transpositions(key)]
    return swapped + [c for c in difflib.get_close_matches(key, known, n=n) if c not in swapped]


class Registry:
    """Maps names (and aliases) to builders: classes or functions that return a component.

    ``locations`` are modules of this package imported on first use so that their decorators run;
    ``entry_point_group`` names the group third-party packages publish entries under (each entry point's
    name is the registry name, its object the builder; or a module, imported for its decorators).
    """

    def __init__(self, kind: str, locations: Iterable[str] = (), entry_point_group: str | None = None):
        self.kind = kind
        self._locations = tuple(locations)
        self._entry_point_group = entry_point_group or f"backdoorbench_gic.{kind}"
        self._builders: dict[str, Callable[..., Any]] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False
        self._loading = False

    # -- registration -------------------------------------------------------------------------------------
    def register(self, name: str | None = None, *, aliases: Iterable[str] = (), force: bool = False):
        """Decorator: ``@REG.register("ft", aliases=["finetune"])``; the name defaults to the object's name."""

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or obj.__name__, obj, aliases=aliases, force=force)
            return obj

        return deco

    def add(self, name: str, obj: Callable[..., Any], *, aliases: Iterable[str] = (), force: bool = False) -> None:
        key = self._norm(name)
        if not force and (key in self._builders or key in self._aliases):
            existing = self._builders.get(key) or self._builders[self._aliases[key]]
            if existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered (to {existing!r}); pass force=True to replace it")
        self._builders[key] = obj
        for alias in aliases:
            a = self._norm(alias)
            if not force and a in self._builders and self._builders[a] is not obj:
                raise ValueError(f"alias {alias!r} of {self.kind} {name!r} collides with a registered name")
            self._aliases[a] = key
        if hasattr(obj, "__dict__"):
            try:
                obj.registry_name = key  # lets a component know the name it was built under
            except (AttributeError, TypeError):
                pass

    @property
    def entry_point_group(self) -> str:
        """The entry-point group third-party packages publish this registry's entries under."""
        return self._entry_point_group

    # -- lookup ---------------------------------------------------------------------------------------------
    def _norm(self, name: str) -> str:
        return name.strip().lower()

    def _ensure_loaded(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self._locations:
                importlib.import_module(module)
            self._load_entry_points()
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_points(self) -> None:
        try:
            eps = metadata.entry_points(group=self._entry_point_group)
        except TypeError:  # Python < 3.10 signature; kept for safety
            eps = metadata.entry_points().get(self._entry_point_group, [])
        for ep in eps:
            key = self._norm(ep.name)
            if key in self._builders:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the whole registry down
                log.warning("could not load %s entry point %r (%s): %s", self.kind, ep.name, ep.value, exc)
                continue
            if callable(obj) and key not in self._builders:
                self.add(ep.name, obj)

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` or an alias of it."""
        self._ensure_loaded()
        key = self._norm(name)
        if key in self._builders:
            return key
        if key in self._aliases:
            return self._aliases[key]
        close = suggestions(key, self.names(include_aliases=True))
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names())}"
            + (f" (aliases: {', '.join(sorted(self._aliases))})" if self._aliases else "")
        )

    def get(self, name: str) -> Callable[..., Any]:
        return self._builders[self.resolve(name)]

    def build(self, spec: str | dict, *args: Any, **kwargs: Any) -> Any:
        """Build from a name or from ``{"type": name, **kwargs}`` (explicit kwargs win over the dict's)."""
        if isinstance(spec, dict):
            spec = dict(spec)
            try:
                name = spec.pop("type")
            except KeyError:
                raise ValueError(f"a {self.kind} spec dict needs a 'type' key, got keys {sorted(spec)}") from None
            kwargs = {**spec, **kwargs}
        else:
            name = spec
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: str | None = None, include_aliases: bool = False) -> list[str]:
        self._ensure_loaded()
        names = list(self._builders) + (list(self._aliases) if include_aliases else [])
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern.lower())]
        return sorted(names)

    def aliases_of(self, name: str) -> list[str]:
        key = self.resolve(name)
        return sorted(a for a, target in self._aliases.items() if target == key)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.resolve(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def table(self) -> str:
        """A readable listing: name, aliases, and the first line of the builder's docstring."""
        rows = []
        for n in self.names():
            obj = self._builders[n]
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            alias = ", ".join(self.aliases_of(n))
            rows.append((n, alias, doc[0] if doc else ""))
        if not rows:
            return f"{self.kind}s: (none)"
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{self.kind}s:"]
        for n, a, d in rows:
            lines.append(f"  {n:<{w0}}  {a:<{w1}}  {d}".rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._builders)} entries)"


# The project's registries. Each lists the modules whose decorators fill it.
MODELS = Registry("model", locations=["backdoorbench_gic.models"])
DATASETS = Registry("dataset", locations=["backdoorbench_gic.data.datasets"])
ATTACKS = Registry("attack", locations=["backdoorbench_gic.attacks"])
DEFENSES = Registry("defense", locations=["backdoorbench_gic.defenses", "backdoorbench_gic.gic.defense"])
AUX_SOURCES = Registry("aux_source", locations=["backdoorbench_gic.auxdata"])

ALL_REGISTRIES = (MODELS, DATASETS, ATTACKS, DEFENSES, AUX_SOURCES)
