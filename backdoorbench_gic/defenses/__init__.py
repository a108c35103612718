"""Purification defenses behind one interface (:class:`Defense`), registered by BackdoorBench name.

Importing this package registers ``ft``, ``ft-sam``, ``fst``, ``sau``, ``i-bau``, ``nad``, ``fp``, ``anp``,
``npd``, ``clp`` and ``pam`` in :data:`~backdoorbench_gic.registry.DEFENSES`; build one with
``DEFENSES.get(name).from_sources(dataset, yaml_path, cli)`` and call ``.purify(model, aux, device=...)``.
A new defense is one module with a config dataclass and a :class:`Defense` subclass holding its algorithm.
"""
from .anp import ANP, ANPConfig
from .base import Defense, DefenseConfig, PurifyResult, Run
from .clp import CLP, CLPConfig
from .fp import FP, FPConfig
from .fst import FST, FSTConfig
from .ft import FT, FTConfig
from .ft_sam import FTSAM, FTSAMConfig
from .i_bau import IBAU, IBAUConfig
from .nad import NAD, NADConfig
from .npd import NPD, NPDConfig
from .pam import PAM, PAMConfig
from .sau import SAU, SAUConfig

__all__ = ["Defense", "DefenseConfig", "PurifyResult", "Run", "FT", "FTConfig", "FTSAM", "FTSAMConfig", "FST",
           "FSTConfig", "SAU", "SAUConfig", "IBAU", "IBAUConfig", "NAD", "NADConfig", "FP", "FPConfig", "ANP",
           "ANPConfig", "NPD", "NPDConfig", "CLP", "CLPConfig", "PAM", "PAMConfig"]
