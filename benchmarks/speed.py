"""What Guided Input Calibration costs: per step next to the victim, per run next to the base defense, in memory.

GIC issue targets, measured on one machine (the CPU, and a GPU when one is present: ``--device auto``):

1. **Step ratio <= 1.2**: one GIC calibration step / one victim forward+backward w.r.t. the input on the same
   batch (default 128). That forward+backward is the least a step must do: the objective needs the victim's
   output (and BN statistics) on g(x) and the gradient flows back through the victim to g. A step is timed
   through the package's own code path, :func:`backdoorbench_gic.gic.fit.fit_calibrator`: fits of ``s0`` and
   ``s0 + k`` steps on an auxiliary set of exactly one batch, the difference divided by ``k`` (so the setup,
   building g, the hooks and the optimiser, cancels out). The victim reference runs ``k`` times in a block
   between the two fits, so load from other processes hits both alike; the table gives the median over
   ``--reps`` of the per-repeat ratios, for the default config (universal L-inf prompt + BN-statistics objective)
   and every other objective and family (BN w2, CE, infomax, +drift, L2, generator, prompt+generator). For
   context it also gives the ratio to a *training* forward+backward (train mode, weight gradients: what one FT
   step costs before the optimiser).
2. **GIC adds <= 25 % to FT's wall time**: the whole calibration stage as the ``gic`` defense runs it
   (:meth:`GICDefense.calibrate`: the fit with the default 100 steps of batch 128, applying g, the D_BN and drift
   diagnostics; no cache) against one run of the registered ``ft`` defense (its packaged
   ``defense_configs/ft/<dataset>.yaml``, optionally ``--ft_epochs``) on the same synthetic auxiliary set
   (``--aux_size``, default 300 = the yaml's ratio 0.005 of Fashion-MNIST). ``--gic_patience 0`` (default) runs all
   steps, the worst case; the config's own default (25) may stop earlier.
3. **Peak memory** of each measured operation. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory
   allocated before it (in this process). CPU: the increase of the peak resident set size (``ru_maxrss``) over
   the operation, each operation in a fresh process (a process's peak never goes down, so sharing one would hide
   every peak below an earlier one).

The victim is a randomly initialised network (the cost does not depend on the weights) in eval mode, as GIC
uses it; the auxiliary set is random uint8 images with balanced labels. Results accumulate per device and setting
in ``<out>/speed.json`` (a later run adds or replaces its own rows) and render to ``<out>/speed.md``.

    python benchmarks/speed.py                                   # CPU (+ GPU if present), width-16 PreActResNet-18
    python benchmarks/speed.py --model smallcnn --width 32       # the small CNN
    python benchmarks/speed.py --dataset cifar10                 # 3 x 32 x 32 inputs
    python benchmarks/speed.py --device cuda --ft_epochs 100     # the GPU alone, BackdoorBench's FT length
    python benchmarks/speed.py --smoke --out /tmp/speed          # seconds: checks the script, numbers meaningless

This supersedes ``benchmarks/gic_step.py`` (its interleaved step ratio is item 1 here, now through the real fit).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from backdoorbench_gic.analysis import command_line, cpu_model, machine_info
from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.data.specs import get_spec
from backdoorbench_gic.data.transforms import TrainAugment
from backdoorbench_gic.gic.fit import GICConfig, fit_calibrator, frozen
from backdoorbench_gic.models import build_model
from backdoorbench_gic.registry import DEFENSES
from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text
from backdoorbench_gic.utils.runtime import autocast, prepare_model, to_device

RESULTS = Path(__file__).resolve().parent / "results"
STEP_TARGET = 1.2  # GIC step / victim forward+backward w.r.t. the input
WALL_TARGET = 0.25  # GIC's calibration stage / FT run

# GICConfig overrides per variant; "default" is GICConfig() as it ships
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("prompt, L-inf, BN (symmetric KL)", {}),
    "bn-w2": ("prompt, L-inf, BN (scaled W2)", {"objectives": {"bn": {"weight": 1.0, "distance": "w2"}}}),
    "ce": ("prompt, L-inf, cross-entropy", {"objectives": {"ce": 1.0}}),
    "infomax": ("prompt, L-inf, infomax", {"objectives": {"infomax": 1.0}}),
    "bn+drift": ("prompt, L-inf, BN + drift penalty", {"objectives": {"bn": 1.0, "drift": 1.0}}),
    "l2": ("prompt, L2, BN", {"norm": "l2", "delta": 1.0}),
    "generator": ("generator, L-inf, BN", {"family": "generator"}),
    "prompt+generator": ("prompt+generator, L-inf, BN", {"family": "prompt+generator"}),
}


# ---------------------------------------------------------------------------------------------------------
# machine and setup
# ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_victim(s: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A randomly initialised victim (seed 0) in eval mode, on ``device`` as the pipeline prepares it."""
    spec = get_spec(s["dataset"])
    torch.manual_seed(0)
    victim = build_model(s["model"], spec.num_classes, s["dataset"], width=s["width"])
    return prepare_model(victim, device).eval()


def synthetic_aux(s: dict[str, Any], n: int, seed: int = 0) -> ImageSet:
    """Random uint8 images of the dataset's shape with balanced labels."""
    spec = get_spec(s["dataset"])
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, spec.channels, spec.height, spec.width), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(n) % spec.num_classes, name=f"synthetic{n}")


def gic_config(s: dict[str, Any], variant: str) -> GICConfig:
    cfg = GICConfig(**{**VARIANTS[variant][1], "gic_patience": 0, "gic_batch_size": s["batch"]})
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------
# the operations that are timed
# ---------------------------------------------------------------------------------------------------------
def victim_input_grad(victim, x, y, device, amp: bool) -> None:
    """One forward+backward of the frozen victim w.r.t. the input (the floor of a calibration step)."""
    xg = x.detach().requires_grad_(True)
    with autocast(device, amp):
        loss = F.cross_entropy(victim(xg).float(), y)
    loss.backward()


def victim_train_step(net, x, y, device, amp: bool) -> None:
    """One training forward+backward (train mode, weight gradients), no optimiser step: an FT step's core."""
    with autocast(device, amp):
        loss = F.cross_entropy(net(x).float(), y)
    net.zero_grad(set_to_none=True)
    loss.backward()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def fit_run(victim, aux, cfg, device, steps: int, amp: bool) -> None:
    fit_calibrator(victim, aux, cfg, device=device, seed=0, amp=amp, progress=False, steps=steps)


def defenses(s: dict[str, Any], device: torch.device):
    """(the gic defense over ft, the ft defense), both from their packaged yaml files plus our overrides."""
    common = {"device": str(device), "amp": s["amp"]}
    gic = DEFENSES.get("gic").from_sources(s["dataset"], None, {
        **common, "base": "ft", "gic_cache": False, "gic_patience": s["gic_patience"],
        **({"gic_steps": s["gic_steps"]} if s["gic_steps"] is not None else {})})
    ft = DEFENSES.get("ft").from_sources(s["dataset"], None, {
        **common, **({"epochs": s["ft_epochs"]} if s["ft_epochs"] is not None else {})}, name="ft")
    return gic, ft


# ---------------------------------------------------------------------------------------------------------
# memory: CUDA in this process, CPU in a fresh process per operation
# ---------------------------------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM of /proc/self/status, the peak of this address space alone
    (``ru_maxrss`` also keeps the size of the parent this process was forked from, which hides a small child's
    own peak); elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def run_operation(s: dict[str, Any], op: str, device: torch.device) -> Callable[[], Any]:
    """Set up ``op`` (everything but the operation itself) and return a callable that runs it once."""
    victim = build_victim(s, device)
    if op in ("gic_stage", "ft_run"):
        aux = synthetic_aux(s, s["aux_size"])
        gic, ft = defenses(s, device)
        if op == "gic_stage":
            return lambda: gic.calibrate(victim, aux, device=device, progress=False)
        augment = TrainAugment.for_spec(get_spec(s["dataset"]))
        return lambda: ft.purify(victim, aux, device=device, train_augment=augment, progress=False)
    aux = synthetic_aux(s, s["batch"])
    x, y = to_device(aux.float_images(), device), aux.labels.to(device)
    k = s["steps_per_rep"]
    if op == "victim_input":
        def run():
            with frozen(victim):
                for _ in range(k):
                    victim_input_grad(victim, x, y, device, s["amp"])
        return run
    if op == "victim_train":
        net = copy.deepcopy(victim).train()
        return lambda: [victim_train_step(net, x, y, device, s["amp"]) for _ in range(k)]
    variant = op.split(":", 1)[1]
    cfg = gic_config(s, variant)
    return lambda: fit_run(victim, aux, cfg, device, s["s0"] + k, s["amp"])


def _reset_peak_rss() -> bool:
    """Linux: set the peak RSS (VmHWM, which ru_maxrss reports) back to the current RSS, so that the peak of
    what runs next is measured and not one left by imports or setup. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_memory_job(s: dict[str, Any], op: str) -> dict[str, float]:
    """In a fresh process: set up, reset the peak RSS to the current RSS, run the operation once, read the peak."""
    torch.set_num_threads(s["threads"])
    run = run_operation(s, op, torch.device("cpu"))
    reset = _reset_peak_rss()
    before = _maxrss_mib()
    t = time.perf_counter()
    run()
    seconds = time.perf_counter() - t
    after = _maxrss_mib()
    return {"peak_mib": after, "base_mib": before, "increase_mib": after - before, "seconds": seconds,
            "peak_reset": reset}


def cpu_memory(s: dict[str, Any], ops: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    ctx = mp.get_context("spawn")
    for op in ops:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:  # one fresh process per operation
            out[op] = pool.submit(_cpu_memory_job, s, op).result()
        print(f"  memory {op}: peak RSS +{out[op]['increase_mib']:.1f} MiB", flush=True)
    return out


def cuda_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "base_mib": base / 2**20, "increase_mib": (peak - base) / 2**20}


# ---------------------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------------------
def measure_steps(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per variant: median per-step times and ratios over ``reps`` interleaved repeats."""
    victim = build_victim(s, device)
    net = copy.deepcopy(victim).train()  # train-mode forwards update BN statistics: keep them off the victim
    aux = synthetic_aux(s, s["batch"])
    x, y = to_device(aux.float_images(), device), aux.labels.to(device)
    k, s0, amp = s["steps_per_rep"], s["s0"], s["amp"]

    def input_block():
        with frozen(victim):
            for _ in range(k):
                victim_input_grad(victim, x, y, device, amp)

    def train_block():
        for _ in range(k):
            victim_train_step(net, x, y, device, amp)

    for _ in range(2):  # warm-up (allocator, kernel selection)
        input_block()
        train_block()
    rows, ref_input, ref_train = [], [], []
    for variant in s["variants"]:
        cfg = gic_config(s, variant)
        fit_run(victim, aux, cfg, device, s0 + 1, amp)  # warm-up
        step, r_in, r_tr = [], [], []
        for _ in range(s["reps"]):
            t_in = timed(input_block, device) / k
            short = timed(lambda: fit_run(victim, aux, cfg, device, s0, amp), device)
            long = timed(lambda: fit_run(victim, aux, cfg, device, s0 + k, amp), device)
            t_tr = timed(train_block, device) / k
            g = max(long - short, 0.0) / k
            step.append(g)
            r_in.append(g / t_in)
            r_tr.append(g / t_tr)
            ref_input.append(t_in)
            ref_train.append(t_tr)
        mem = None
        if device.type == "cuda":
            mem = cuda_memory(lambda: fit_run(victim, aux, cfg, device, s0 + k, amp), device)
        rows.append({"variant": variant, "description": VARIANTS[variant][0],
                     "gic_step_ms": 1000 * statistics.median(step),
                     "ratio_input_grad": statistics.median(r_in), "ratio_train_step": statistics.median(r_tr),
                     "ratio_input_grad_range": [min(r_in), max(r_in)], "memory": mem})
        print(f"  {variant:>17}: step {rows[-1]['gic_step_ms']:.1f} ms, {rows[-1]['ratio_input_grad']:.2f}x input "
              f"fwd+bwd, {rows[-1]['ratio_train_step']:.2f}x train fwd+bwd", flush=True)
    out = {"victim_input_grad_ms": 1000 * statistics.median(ref_input),
           "victim_train_step_ms": 1000 * statistics.median(ref_train), "variants": rows}
    if device.type == "cuda":
        out["victim_input_grad_memory"] = cuda_memory(input_block, device)
        out["victim_train_step_memory"] = cuda_memory(train_block, device)
    return out


def measure_wall(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """GIC's calibration stage vs one FT run, alternating, medians over ``wall_reps``."""
    victim = build_victim(s, device)
    aux = synthetic_aux(s, s["aux_size"])
    gic, ft = defenses(s, device)
    augment = TrainAugment.for_spec(get_spec(s["dataset"]))
    stage, fit, ft_s, steps = [], [], [], []
    mem_gic = mem_ft = None
    for rep in range(s["wall_reps"]):
        _sync(device)
        t = time.perf_counter()
        _, info = gic.calibrate(victim, aux, device=device, progress=False)
        _sync(device)
        stage.append(time.perf_counter() - t)
        fit.append(info["gic_seconds"])
        steps.append(int(info["gic_steps"]))
        ft_s.append(timed(lambda: ft.purify(victim, aux, device=device, train_augment=augment, progress=False), device))
        print(f"  wall rep {rep + 1}: GIC stage {stage[-1]:.1f} s (fit {fit[-1]:.1f} s, {steps[-1]} steps), "
              f"FT {ft_s[-1]:.1f} s", flush=True)
    if device.type == "cuda":
        mem_gic = cuda_memory(lambda: gic.calibrate(victim, aux, device=device, progress=False), device)
        mem_ft = cuda_memory(lambda: ft.purify(victim, aux, device=device, train_augment=augment, progress=False),
                             device)
    st, fi, fs = statistics.median(stage), statistics.median(fit), statistics.median(ft_s)
    return {"gic_stage_s": st, "gic_fit_s": fi, "ft_s": fs, "stage_over_ft": st / fs, "fit_over_ft": fi / fs,
            "gic_steps_run": steps, "gic_steps": gic.config.gic_steps, "gic_batch_size": gic.config.gic_batch_size,
            "gic_patience": gic.config.gic_patience, "ft_epochs": ft.config.epochs,
            "ft_batch_size": ft.config.batch_size,
            "aux_size": s["aux_size"], "stage_s_all": stage, "ft_s_all": ft_s, "memory_gic_stage": mem_gic,
            "memory_ft_run": mem_ft}


def measure(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"
    print(f"[{name}] step timing: batch {s['batch']}, {s['reps']} repeats of {s['steps_per_rep']} steps", flush=True)
    steps = measure_steps(s, device)
    print(f"[{name}] wall time: GIC calibration stage vs FT on {s['aux_size']} images", flush=True)
    wall = measure_wall(s, device)
    if device.type == "cpu" and not s["no_memory"]:
        print(f"[{name}] memory (one fresh process per operation)", flush=True)
        ops = ["victim_input", "victim_train"] + [f"fit:{v}" for v in s["variants"]] + ["gic_stage", "ft_run"]
        mem = cpu_memory(s, ops)
        steps["victim_input_grad_memory"] = mem["victim_input"]
        steps["victim_train_step_memory"] = mem["victim_train"]
        for row in steps["variants"]:
            row["memory"] = mem[f"fit:{row['variant']}"]
        wall["memory_gic_stage"], wall["memory_ft_run"] = mem["gic_stage"], mem["ft_run"]
    if device.type == "cuda":
        method = "torch.cuda.max_memory_allocated minus the memory allocated before, in this process"
    elif s["no_memory"]:
        method = "not measured (--no_memory)"
    else:
        reset = all(m.get("peak_reset") for m in mem.values())
        method = ("peak RSS (VmHWM, as ru_maxrss without the forked parent's share) after the operation minus the "
                  "RSS before it, one fresh process per operation"
                  + (", the peak reset to the current RSS after setup (/proc/self/clear_refs)" if reset else
                     "; the peak could not be reset, so an operation whose peak stays below the setup's reads 0"))
    return {"device": name, "device_type": device.type, "memory_method": method, "steps": steps, "wall": wall}


# ---------------------------------------------------------------------------------------------------------
# verdicts and the report
# ---------------------------------------------------------------------------------------------------------
def step_verdict(ratio: float) -> str:
    return "ok" if ratio <= STEP_TARGET else f"MISS: {ratio:.2f}x > {STEP_TARGET}x"


def wall_verdict(frac: float) -> str:
    return "ok" if frac <= WALL_TARGET else f"MISS: +{100 * frac:.0f} % > +{100 * WALL_TARGET:.0f} %"


def _mib(m: dict | None) -> str:
    return "-" if not m else f"{m['increase_mib']:.1f}"


def render(results: dict[str, Any]) -> str:
    lines = ["# GIC speed benchmark", "",
             f"Targets (GIC issue): one calibration step <= {STEP_TARGET}x one victim forward+backward w.r.t. the input "
             f"on the same batch; the GIC calibration stage adds <= {100 * WALL_TARGET:.0f} % to FT's wall time. "
             "Victims are randomly initialised (cost does not depend on the weights), in eval mode; auxiliary images "
             "are synthetic. Step times come from `fit_calibrator` itself (fits of s0 and s0 + k steps, difference / k). "
             "Memory: the increase of the peak during the operation (see the method per section). How to rerun: "
             "`python benchmarks/speed.py --help`.", ""]
    for key, r in results.items():
        st, w, m = r["steps"], r["wall"], r["machine"]
        s = r["settings"]
        lines += [f"## {key}", "",
                  f"{r['device']}; machine: {m['cpu']}, {m['cores']} cores, {s['threads']} torch threads"
                  f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; load average at start {m.get('load_avg')}; "
                  f"torch {m['torch']}; {r['date']}; `{r['command']}`", "",
                  f"Victim forward+backward on batch {s['batch']}: w.r.t. the input {st['victim_input_grad_ms']:.1f} ms "
                  f"(memory {_mib(st.get('victim_input_grad_memory'))} MiB); training (weights, train mode) "
                  f"{st['victim_train_step_ms']:.1f} ms (memory {_mib(st.get('victim_train_step_memory'))} MiB). "
                  f"Median of {s['reps']} repeats of {s['steps_per_rep']} steps. Memory: {r['memory_method']}.", "",
                  "| variant | g, norm, objective | GIC step (ms) | step / input fwd+bwd | (min-max) | "
                  "step / train fwd+bwd | peak memory increase (MiB) | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in st["variants"]:
            lo, hi = row["ratio_input_grad_range"]
            lines.append(f"| {row['variant']} | {row['description']} | {row['gic_step_ms']:.1f} | "
                         f"{row['ratio_input_grad']:.2f}x | {lo:.2f}-{hi:.2f} | {row['ratio_train_step']:.2f}x | "
                         f"{_mib(row.get('memory'))} | {step_verdict(row['ratio_input_grad'])} |")
        steps_run = sorted(set(w["gic_steps_run"]))
        lines += ["", f"Whole runs on {w['aux_size']} auxiliary images, median of {s['wall_reps']}: GIC "
                      f"{w['gic_steps']} steps of batch {w['gic_batch_size']} (patience {w['gic_patience']}; steps run "
                      f"{', '.join(map(str, steps_run))}) against FT {w['ft_epochs']} epochs of batch {w['ft_batch_size']}.",
                  "",
                  "| GIC stage (s) | of which fit (s) | FT run (s) | GIC stage / FT | fit / FT | "
                  "memory GIC stage (MiB) | memory FT (MiB) | verdict |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {w['gic_stage_s']:.2f} | {w['gic_fit_s']:.2f} | {w['ft_s']:.2f} | +{100 * w['stage_over_ft']:.0f} % | "
                  f"+{100 * w['fit_over_ft']:.0f} % | {_mib(w.get('memory_gic_stage'))} | {_mib(w.get('memory_ft_run'))} | "
                  f"{wall_verdict(w['stage_over_ft'])} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="targets: step ratio <= 1.2; GIC stage <= +25 % of FT's wall time")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the CPU, and the GPU as well when one is present")
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--width", type=int, default=16, help="0: the model's full width")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="input shape, classes, normalisation and FT yaml (cifar10 or fashion-mnist-3x32: 3 x 32 x 32)")
    p.add_argument("--batch", type=int, default=128, help="the batch of a step (GIC's default gic_batch_size)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repeats of the step timing")
    p.add_argument("--steps_per_rep", type=int, default=10, help="k: steps per timed block")
    p.add_argument("--s0", type=int, default=2, help="steps of the short fit that is subtracted")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all")
    p.add_argument("--aux_size", type=int, default=300, help="auxiliary images for the GIC-vs-FT wall time")
    p.add_argument("--wall_reps", type=int, default=3)
    p.add_argument("--gic_steps", type=int, default=None, help="default: the config's (100)")
    p.add_argument("--gic_patience", type=int, default=0,
                   help="0 runs every step (worst case); the config default is 25")
    p.add_argument("--ft_epochs", type=int, default=None, help="default: the packaged ft yaml's for --dataset")
    p.add_argument("--no_amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no_memory", action="store_true", help="CPU: skip the fresh-process memory probes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(RESULTS), help="folder for speed.md and speed.json")
    p.add_argument("--smoke", action="store_true",
                   help="tiny everything (batch 16, 2 repeats of 2 steps, 2 variants, 5 GIC steps, 1 FT epoch)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.reps, args.steps_per_rep, args.s0 = 16, 2, 2, 1
        args.aux_size, args.wall_reps, args.gic_steps, args.ft_epochs = 40, 1, 5, 1
        args.variants = args.variants or ["default", "generator"]
    args.variants = args.variants or list(VARIANTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available on this machine")
        devices.append(torch.device("cuda"))

    settings = {"model": args.model, "width": args.width or None, "dataset": args.dataset, "batch": args.batch,
                "reps": args.reps, "steps_per_rep": args.steps_per_rep, "s0": args.s0, "variants": args.variants,
                "aux_size": args.aux_size, "wall_reps": args.wall_reps, "gic_steps": args.gic_steps,
                "gic_patience": args.gic_patience, "ft_epochs": args.ft_epochs, "amp": not args.no_amp,
                "threads": torch.get_num_threads(), "no_memory": args.no_memory, "smoke": args.smoke}
    out = Path(args.out)
    store = out / "speed.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    command = command_line(__file__, argv)
    machine = machine_info()
    for device in devices:
        r = measure(settings, device)
        key = (f"{'GPU ' + r['device'] if device.type == 'cuda' else 'CPU'}: {args.model} w{args.width or 'full'}, "
               f"{args.dataset}, batch {args.batch}{' (smoke)' if args.smoke else ''}")
        results[key] = {**r, "settings": settings, "machine": machine, "command": command,
                        "date": time.strftime("%Y-%m-%d %H:%M")}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, results)  # each device's rows are kept as soon as they exist
    text = render(results)
    atomic_write_text(out / "speed.md", text)
    print(text)
    print(f"wrote {out / 'speed.md'} (rows kept in {store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
