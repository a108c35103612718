"""FROZEN (2026-11-25 result; not maintained): superseded by the export/import round-trip tests of
tests/test_aux_sources.py, which run on every commit. Kept to reproduce BENCHMARKS.md's archived table.

Every auxiliary source builds for a real victim and survives BackdoorBenchER's on-disk layout
(data/<ds>/<type>/<label:05d>/<i:05d>.png): export, re-import, compare pixel for pixel, labels, pool indices and
provenance. 8-bit sources must come back unchanged; float sources (synthetic:inversion) are quantised to 8 bits by
the export (with a warning), so for them the largest pixel error is reported instead (at most 0.5/255).

    python benchmarks/archive/aux_roundtrip.py --result_file badnet_fm_cnn16 --bb_root bbgic_bench
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from backdoorbench_gic.analysis import describe_machine, md_table

HERE = Path(__file__).resolve().parent

TYPES = ["train", "reserved", "reserved_brightness", "reserved_contrast", "reserved_color_jitter",
         "reserved_gaussian_blur", "reserved_rotation", "reserved_noise", "reserved_jpeg", "synthetic:inversion",
         "mix:reserved+reserved_noise+reserved_rotation"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result_file", required=True)
    p.add_argument("--bb_root", default=None)
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--n_per_class", type=int, default=20)
    p.add_argument("--external", default=None, help="also an external:<dataset> source (e.g. digits for MNIST)")
    p.add_argument("--out", default=str(HERE.parent / "results" / "aux_roundtrip.md"))
    args = p.parse_args(argv)

    from backdoorbench_gic.auxdata import build_aux_set, export_image_folder, import_image_folder
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.utils.io import atomic_write_text

    record = load_attack_record(args.result_file, args.bb_root)
    victim = record.build_model().eval()
    types = list(args.types) + ([f"external:{args.external}"] if args.external else [])
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            t0 = time.perf_counter()
            aux = build_aux_set(record, t, n_per_class=args.n_per_class, ratio=None, seed=0, victim=victim)
            folder = export_image_folder(aux, Path(tmp) / t.replace(":", "_").replace("+", "_"))
            back = import_image_folder(folder, record.spec, order="file")
            is_float = aux.images.dtype != torch.uint8
            a = aux.float_images() if is_float else aux.images
            b = back.float_images() if is_float else back.images
            err = float((a.float() - b.float()).abs().max()) * (255 if is_float else 1)
            same_meta = (torch.equal(back.labels, aux.labels) and torch.equal(back.indices, aux.indices)
                         and torch.equal(back.sources, aux.sources) and back.source_names == aux.source_names)
            lossless = err == 0 and same_meta
            verdict = "unchanged" if lossless else (
                f"quantised (max error {err:.2f}/255), metadata {'same' if same_meta else 'DIFFERENT'}" if is_float
                else "CHANGED")
            ok &= lossless or (is_float and err <= 0.5 + 1e-3 and same_meta)
            rows.append([t, len(aux), str(aux.images.dtype).replace("torch.", ""), " ".join(aux.source_names),
                         verdict, f"{time.perf_counter() - t0:.1f}"])
    text = (f"## Auxiliary sources through BackdoorBenchER's layout: `{record.name}`\n\n"
            f"`python benchmarks/archive/aux_roundtrip.py {' '.join(sys.argv[1:])}`; {describe_machine()}; "
            f"{args.n_per_class} per class, seed 0.\n\n"
            + md_table(["source", "images", "dtype", "provenance", "export -> import", "s"], rows)
            + f"\n\nAll sources {'pass' if ok else 'DO NOT all pass'}.\n")
    atomic_write_text(args.out, text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
