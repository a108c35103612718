"""``bbgic list``: every registry and what it holds."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list", help="list registered models, datasets, attacks, defenses and auxiliary sources")
    p.add_argument("kind", nargs="?", default=None,
                   help="only this registry (model, dataset, attack, defense, aux_source)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..registry import ALL_REGISTRIES

    kinds = [r for r in ALL_REGISTRIES if args.kind is None or r.kind.startswith(args.kind.rstrip("s"))]
    if not kinds:
        raise ValueError(f"no registry called {args.kind!r}; choose from {', '.join(r.kind for r in ALL_REGISTRIES)}")
    print("\n\n".join(r.table() for r in kinds))
    return 0
