"""The result-column names, re-exported from :mod:`backdoorbench_gic.keys` (where the producers, the pipeline and
GIC, import them without pulling in the analysis stack)."""
from ..keys import EXTRA_PREFIX, Col, GicInfo, extra_column, gic_summary_line

__all__ = ["EXTRA_PREFIX", "Col", "GicInfo", "extra_column", "gic_summary_line"]
