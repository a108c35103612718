"""Auxiliary (clean) data of known quality for backdoor purification.

The paper "Revisiting the Auxiliary Data in Backdoor Purification" (Wei et al., arXiv 2502.07231) sorts the
defender's clean data into seen / unseen in-distribution / OOD by transformation / external / synthetic; this
package builds each kind for a victim, by BackdoorBenchER's names (``--reserved_type reserved_noise``), applies
its sampling rule, reads and writes its on-disk layouts, and measures how far a set is from the victim's
training distribution (:mod:`.quality`). One entry point, :func:`build_aux_set` (:mod:`.build`), serves the
pipeline, the GIC wrapper and the matrix runner; :func:`check_aux_request` checks a request before any model is
built.

Type names (``bbgic list aux_source``): ``train``, ``reserved``, ``reserved_<shift>`` (brightness, contrast,
color_jitter, gaussian_blur, rotation, noise (clipped), noise_wrap (BackdoorBenchER's wrapped noise), jpeg,
``reserved_tv:<spec>``), ``external:<name or folder>``,
``synthetic:<folder>``, ``synthetic:inversion``, ``folder:<name or path>`` (and any other ``reserved_*`` folder
BackdoorBenchER made), ``<type>_vp``, and ``mix:<a>+<b>[@weight]+...``.
"""
from __future__ import annotations

from .base import AuxContext, AuxDataError, Pool
from .build import accepted_options, build_aux_set, check_aux_request, known_types, options_for, parse_reserved_type
from .layout import (export_image_folder, export_reserved_shift, import_image_folder, read_vp_arrays, vp_dir,
                     write_vp_arrays)
from .sampling import read_index_file, sample_positions, write_index_file
from .split import make_split

__all__ = [
    "build_aux_set", "check_aux_request", "parse_reserved_type", "known_types", "accepted_options", "options_for",
    "AuxDataError", "AuxContext", "Pool",
    "sample_positions", "read_index_file", "write_index_file", "export_image_folder", "import_image_folder",
    "export_reserved_shift", "read_vp_arrays", "write_vp_arrays", "vp_dir", "make_split",
]
