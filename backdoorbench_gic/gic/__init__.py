"""Guided Input Calibration: the calibration object (:class:`GIC`: fit / transform / __call__ / state_dict), its
bounded calibrators, registered objectives, the fitting loop, the drift monitor and the ``gic`` defense that places
it around any base defense."""
from .calibration import GIC
from .fit import GICConfig
from .objectives import OBJECTIVES, Objective

__all__ = ["GIC", "GICConfig", "OBJECTIVES", "Objective"]
