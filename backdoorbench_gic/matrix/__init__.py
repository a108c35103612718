"""Attack x defense x auxiliary-data x GIC x seed matrices: a YAML spec, resumable execution on a local
process pool or a Ray cluster, and leaderboard tables and plots."""
from .report import collect_results, write_report
from .runner import (MatrixSpecError, audit_runs, check_cells, matrix_status, render_status, run_matrix,
                     validate_matrix)
from .spec import Cell, MatrixSpec, load_spec, parse_spec, validate_spec

__all__ = ["Cell", "MatrixSpec", "MatrixSpecError", "audit_runs", "check_cells", "collect_results", "load_spec",
           "matrix_status", "parse_spec", "render_status", "run_matrix", "validate_matrix", "validate_spec",
           "write_report"]
