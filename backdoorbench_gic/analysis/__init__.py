"""What the reports share: result-column names, pairing with and without GIC and the gap/recovery figures,
finished cells with their records and purified models, tables and ``mean ± SE`` cells, the machine line.

``bbgic matrix report`` and every script in ``benchmarks/`` use these; a benchmark script imports the library,
never another script.
"""
from .cells import FinishedCell, Victims, finished_cells
from .compare import (CELL_KEYS, COMPARED, GAP_THRESHOLD, IN_DISTRIBUTION, PAIR_KEYS, REFERENCE_AUX, gic_comparison,
                      mean_se, paired, reference_gaps, share_recovered, spearman, standard_error,
                      with_base_defense)
from .keys import EXTRA_PREFIX, Col, GicInfo, extra_column
from .machine import command_line, cpu_model, describe_machine, machine_info
from .tables import frame_table, markdown_table, md_table, nan_dash, percent, pm, victims_table

__all__ = ["CELL_KEYS", "COMPARED", "Col", "EXTRA_PREFIX", "FinishedCell", "GAP_THRESHOLD", "GicInfo",
           "IN_DISTRIBUTION", "PAIR_KEYS", "REFERENCE_AUX", "Victims", "command_line", "cpu_model", "describe_machine", "extra_column",
           "finished_cells", "frame_table", "gic_comparison", "machine_info", "markdown_table", "md_table",
           "mean_se", "nan_dash", "paired", "percent", "pm", "reference_gaps", "share_recovered", "spearman", "standard_error",
           "victims_table", "with_base_defense"]
