"""backdoorbench-gic: a BackdoorBench plugin for auxiliary-data quality, Guided Input Calibration (GIC) and
purification defenses. See README.md for the data flow; everything between stages keeps pixels in [0,1]."""
try:
    from importlib.metadata import version as _version

    __version__ = _version("backdoorbench-gic")
except Exception:  # pragma: no cover - running from a bare checkout
    __version__ = "0.1.0"
