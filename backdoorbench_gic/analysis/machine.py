"""What a benchmark ran on and how it was started, for the header line of its report."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that made a benchmark's result, as typed from the repository root: ``python benchmarks/<script's
    file name> <args>`` (``argv`` defaults to ``sys.argv[1:]``); never the machine's own path to the script."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def describe_machine(torch_threads: bool = False) -> str:
    """One line: the first GPU's name when CUDA is available, else ``<cpu model>, <n> cores`` (and ``, <t> torch
    threads`` with ``torch_threads``)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    line = f"{cpu_model()}, {os.cpu_count()} cores"
    return line + (f", {torch.get_num_threads()} torch threads" if torch_threads else "")


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, the GPUs if any, host, torch and Python versions, OMP_NUM_THREADS and the
    load average: the machine record the timing benchmarks keep beside their numbers."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": ", ".join(gpus) or None, "host": platform.node(), "torch": str(torch.__version__),
            "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg": load_average()}
