"""Purification defenses behind one interface (:class:`Defense`), registered by BackdoorBench name.

Importing this package registers ``ft``, ``ft-sam``, ``fst``, ``sau`` and ``i-bau`` in
:data:`~backdoorbench_gic.registry.DEFENSES`; build one with
``DEFENSES.get(name).from_sources(dataset, yaml_path, cli)`` and call ``.purify(model, aux, device=...)``.
"""
from .base import Defense, DefenseConfig, PurifyResult
from .fst import FST, FSTConfig
from .ft import FT, FTConfig
from .ft_sam import FTSAM, FTSAMConfig
from .i_bau import IBAU, IBAUConfig
from .sau import SAU, SAUConfig

__all__ = ["Defense", "DefenseConfig", "PurifyResult", "FT", "FTConfig", "FTSAM", "FTSAMConfig", "FST", "FSTConfig",
           "SAU", "SAUConfig", "IBAU", "IBAUConfig"]
