"""Run BackdoorBench's (or BackdoorBenchER's) own defense scripts, unmodified, on current torch, optionally with
Guided Input Calibration in front of them (``bbgic bb-run``).

Their script runs in this process through :func:`runpy.run_path`, from the checkout's root as their README
requires, with a few targeted patches that are all undone when it returns (or fails):

- ``torch.load`` -> :func:`backdoorbench_gic.checkpoint.load_allowlisted`: ``weights_only=True`` with the numpy
  allow-list of a BackdoorBench record, whatever the caller asked for. Their ``load_attack_result`` calls
  ``torch.load`` bare, which torch >= 2.6 refuses for every record; the usual fix, ``weights_only=False``, runs
  whatever the pickle says. A file outside the allow-list is refused with its globals' names, and nothing of it runs.
- with GIC, the clean training images their defense draws pass through a calibrator g fitted through the frozen
  victim on exactly those images (:class:`DrawnFit`): the draw is intercepted before training, upstream at
  ``utils.choose_index.choose_index`` (the ``--index`` file or their seeded draw) with the raw dataset behind
  ``load_attack_result(...)['clean_train']`` wrapped; BackdoorBenchER at ``defense.base.defense.get_reserved_data``,
  whose returned subset is what they train on, for every reserved type. A script that reads clean training images
  before any draw gets g fitted on our own draw with its ratio and seed, and the fit line says so. Test and
  poisoned data are never touched. Images reach their pipeline as 8-bit PIL images (as their loaders give them),
  so g(x) is rounded to 1/255.
- numpy >= 2 removed aliases their code still uses (:data:`NUMPY_ALIASES`: ``np.infty`` in their plot helper
  ``general_plot_for_epoch``, which abl, anp, bnp, clp, d-br, dbd, ep, fp, fst, i-bau, mcr, nab, nad, rnp and sau
  call; ``np.float``, ``np.int``, ``np.round_`` in some attacks and triggers): they are defined for the run when
  missing (``numpy_compat=False`` to skip).
- opt-in (``cuda_on_cpu=True``, ``bb-run --cuda_on_cpu``), on a machine without CUDA: tensors their code asks for
  on a CUDA device are made on the CPU (the ``device=`` argument of torch's tensor factories, :data:`CUDA_FACTORIES`;
  ``.cuda()`` on tensors and modules). For scripts that hard-code CUDA whatever ``--device`` says: i-bau.py:496
  (``torch.zeros_like(images, device='cuda')``), upstream dbd.py's trainers (``.cuda(gpu)``). ``.to('cuda')`` and ``torch.device('cuda')`` handed elsewhere
  are not rewritten. Does nothing where CUDA is available.

Their modules are imported from the checkout and dropped from ``sys.modules`` afterwards, as are the log handlers
their ``set_logger`` adds to the root logger; ``sys.argv``, ``sys.path`` and the working directory are restored.
"""
from __future__ import annotations

import contextlib
import logging
import os
import runpy
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .checkpoint import UntrustedCheckpointError, load_allowlisted
from .patching import detect_checkout

log = logging.getLogger(__name__)

# numpy 2 removed these; BackdoorBench's code still spells them (formats doc section 9)
# what their code spells (grep of f02e353 and BackdoorBenchER): np.infty in utils/trainer_cls.py:754-755
# (general_plot_for_epoch); np.float in the ftrojann and patch triggers, attack/trojannn.py and poison_ink;
# np.int in lowFrequency's universal_pert.py; np.round_ in attack/bpp.py. Inf and NaN for their older forks.
NUMPY_ALIASES: dict[str, Any] = {"infty": np.inf, "Inf": np.inf, "NaN": np.nan, "float": float, "int": int,
                                 "round_": np.round}
TRAIN_TYPES = (None, "", "train")
# torch's tensor factories whose device= argument cuda_on_cpu rewrites
CUDA_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange", "linspace",
                  "eye", "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                  "randn_like", "randint_like")


class BBRunError(RuntimeError):
    """The checkout, the script or the request cannot be run as asked; the message says why."""


@dataclass
class RunReport:
    """What happened around their script: the files torch.load read through the allow-list, the datasets whose
    images went through g (where, and how many images), the numpy aliases defined for the run."""

    flavour: str
    script: Path
    loads: list[str] = field(default_factory=list)
    calibrated: list[tuple[str, int]] = field(default_factory=list)
    numpy_aliases: list[str] = field(default_factory=list)
    fits: list[str] = field(default_factory=list)  # one line per g fitted: on which images
    cuda_on_cpu: int | None = None  # CUDA requests made on the CPU instead (None: the shim was not installed)
    exit_code: int = 0
    views: list[tuple[str, int, "CalibratedImages"]] = field(default_factory=list, repr=False)

    def note_calibrated(self, where: str, n: int, view: "CalibratedImages") -> None:
        self.views.append((where, n, view))

    def settle(self) -> None:
        """``calibrated``: the wrapped datasets whose images their script really read through g (a wrap alone
        calibrates nothing: upstream clp.py loads the record and never reads a clean image)."""
        for where, n, view in self.views:
            if view.used and (where, n) not in self.calibrated:  # their defenses load the record twice
                self.calibrated.append((where, n))


# ---------------------------------------------------------------------------------------------------------
# GIC in front of their data
# ---------------------------------------------------------------------------------------------------------
class CalibratedImages(torch.utils.data.Dataset):
    """A view of one of their datasets whose items' first element (the image) is replaced by g(image).

    Their raw datasets yield ``(PIL image, label)``, their ``prepro_cls_DatasetBD_v2`` 5-tuples, BackdoorBenchER's
    ``_vp`` loader float tensors; each comes back in the type it came in (PIL and uint8 arrays rounded to 8 bits).
    Images of another size than g's (GTSRB's raw files) are resized first, as their Resize transform would.
    Every other attribute is the wrapped dataset's, so their code keeps calling its methods."""

    def __init__(self, dataset: Any, calibrator: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int]):
        self.dataset = dataset
        self.calibrator = calibrator
        self.shape = tuple(int(v) for v in shape)  # (C, H, W)
        self.used = 0  # images that went through g

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "calibrator", "shape", "used"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (self.calibrate(item[0]),) + item[1:]
        if isinstance(item, list):
            return [self.calibrate(item[0])] + item[1:]
        return self.calibrate(item)

    def calibrate(self, img: Any) -> Any:
        from PIL import Image

        c, h, w = self.shape
        self.used += 1
        if isinstance(img, torch.Tensor):  # float C x H x W in [0,1] (BackdoorBenchER's _vp arrays)
            with torch.no_grad():
                return self.calibrator(img.float().unsqueeze(0))[0].to(img.dtype)
        arr = uint8_hwc(img, self.shape)
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)
        with torch.no_grad():
            y = self.calibrator(x.unsqueeze(0))[0]
        out = y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        if isinstance(img, np.ndarray):
            return out.reshape(img.shape)
        return Image.fromarray(out[:, :, 0] if c == 1 else out, mode="L" if c == 1 else "RGB")


def uint8_hwc(img: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """One of their raw images (PIL or uint8 array) as an H x W x C uint8 array at (C, H, W) ``shape``; PIL images
    of another size (GTSRB's raw files) are resized as their Resize transform would."""
    from PIL import Image

    c, h, w = shape
    if isinstance(img, Image.Image):
        pil = img.convert("L" if c == 1 else "RGB")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.BILINEAR)
        return np.asarray(pil, dtype=np.uint8).reshape(h, w, c)
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
        arr = img.reshape(img.shape[0], img.shape[1], -1)
        if arr.shape != (h, w, c):
            raise BBRunError(f"an image of shape {img.shape} cannot pass through a calibrator fitted on {(h, w, c)}")
        return arr
    raise BBRunError(f"cannot calibrate an image of type {type(img).__name__} (PIL, uint8 array or float tensor)")


def images_of(dataset: Any, shape: tuple[int, int, int], name: str) -> Any:
    """Their dataset's images and labels (items ``(image, label, ...)``) as one of our uint8 ImageSets."""
    from .data.imageset import ImageSet

    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        xs.append(torch.from_numpy(np.array(uint8_hwc(item[0], shape))).permute(2, 0, 1))
        ys.append(int(item[1]))
    if not xs:
        raise BBRunError(f"{name}: their script drew no images")
    return ImageSet(torch.stack(xs), torch.tensor(ys, dtype=torch.long), name=name)


class DrawnFit:
    """g, fitted through the victim on the images their script draws, when it draws them.

    ``fit(images)`` returns (a CPU calibrator, its description); ``fallback()`` gives the set to fit on when their
    script reads a clean training image before any draw was seen. Each fit is announced (``announce``) and kept in
    ``lines``; a draw of the same images as the last fit reuses it (their fp.py draws twice)."""

    def __init__(self, record: Any, fit: Callable[[Any], tuple[Callable, str]], script: str,
                 fallback: Callable[[], Any] | None = None, announce: Callable[[str], None] = print):
        self.record, self.fit, self.script, self.fallback, self.announce = record, fit, script, fallback, announce
        self.g: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.lines: list[str] = []
        self._key: str | None = None

    def on_images(self, images: Any, which: str) -> None:
        import hashlib

        from .utils.cache import hash_images

        h = hashlib.sha1()
        hash_images(h, images)
        if h.hexdigest() == self._key:
            return
        with torch.enable_grad():  # the fit may start inside their torch.no_grad() code (or ours, in calibrate)
            self.g, described = self.fit(images)
        self._key = h.hexdigest()
        line = (f"GIC: g fitted through the victim of {self.record.name} on {which} ({len(images)} images). "
                f"{described}. The clean images {self.script} draws pass through it; its test data does not.")
        self.lines.append(line)
        self.announce(line)

    def on_positions(self, positions: Any, which: str) -> None:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        self.on_images(self.record.clean_train.subset(pos, name="clean_train"), which)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            if self.fallback is None:
                raise BBRunError(f"{self.script} read a clean training image before drawing its subset, and no "
                                 "fallback set was given")
            aux = self.fallback()
            self.on_images(aux, f"{aux.name}, our own draw with their ratio and seed ({self.script} read clean "
                                "training images before any draw bb-run could see, so its own set is unknown)")
        return self.g(x)


def fit_gic(record: Any, aux: Any, *, dataset: str | None = None, yaml_path: str | None = None,
            settings: dict[str, Any] | None = None, seed: int = 0, device: torch.device | str = "cpu"
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, dict[str, Any]]:
    """g fitted through ``record``'s frozen victim on ``aux``: (a CPU callable on N x C x H x W batches in [0,1],
    GIC's one-line description, the fit's info and summary).

    The one place bb-run touches GIC's API: GIC keys come from ``defense_configs/gic/<dataset>.yaml`` <
    ``yaml_path`` < ``settings``; the seed is ``gic_seed`` when set, else ``seed`` (their ``random_seed``)."""
    from .gic.calibration import GIC
    from .gic.defense import DEFENSE_KEYS
    from .utils.runtime import resolve_device

    device = resolve_device(device)
    # their config/defense/gic/*.yaml configure the gic defense: its own keys (placement, ...) are skipped there
    gic = GIC.from_sources(dataset or record.clean_data, yaml_path, settings or {}, skip=DEFENSE_KEYS)
    if gic.config.per_source and len(aux.source_names) > 1:
        raise BBRunError("per_source fits one g per source of a mix:, but their defense's images carry no source; "
                         "set per_source: false for bb-run")
    victim = record.build_model().to(device)
    gic.fit(victim, aux, device=device, seed=gic.config.gic_seed if gic.config.gic_seed is not None else seed)
    on_cpu = GIC().load_state_dict(gic.state_dict())  # a CPU copy: their DataLoader workers may fork
    return on_cpu, gic.describe(), {**gic.info, **gic.summary}


# ---------------------------------------------------------------------------------------------------------
# the patches
# ---------------------------------------------------------------------------------------------------------
def refusal(exc: UntrustedCheckpointError) -> BBRunError:
    return BBRunError(
        f"refused {exc.path}: it needs the pickle global(s) {', '.join(exc.globals)}, outside the numpy types a "
        "BackdoorBench record holds. A pickle can run code while it loads; bb-run never loads such a file (none of "
        "it ran). Re-save it as a plain state dict if it is yours.")


@contextlib.contextmanager
def allowlisted_torch_load(report: RunReport) -> Iterator[None]:
    """``torch.load`` -> the allow-list loader for the duration; the loader's own inner torch.load passes through."""
    original = torch.load
    state = threading.local()

    def load(f, map_location=None, *args, **kwargs):
        if getattr(state, "inside", False):
            return original(f, map_location, *args, **kwargs)
        if kwargs.get("weights_only") is False:
            log.info("bb-run: %s asked for weights_only=False; loading it through the allow-list instead", f)
        state.inside = True
        try:
            obj = load_allowlisted(f, map_location=map_location)
        except UntrustedCheckpointError as exc:
            raise refusal(exc) from None
        finally:
            state.inside = False
        report.loads.append(str(f))
        return obj

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def numpy_compat(report: RunReport, enabled: bool = True) -> Iterator[None]:
    added = []
    if enabled:
        for name, value in NUMPY_ALIASES.items():
            if not hasattr(np, name):
                setattr(np, name, value)
                added.append(name)
    report.numpy_aliases = [f"np.{n}" for n in added]
    try:
        yield
    finally:
        for name in added:
            with contextlib.suppress(AttributeError):
                delattr(np, name)


def _is_cuda(device: Any) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare ordinal names a CUDA device
        return True
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


@contextlib.contextmanager
def cuda_on_cpu(report: RunReport, enabled: bool = False) -> Iterator[None]:
    """See the module docstring; counts each rewritten request in ``report.cuda_on_cpu``."""
    if not enabled or torch.cuda.is_available():
        yield
        return
    report.cuda_on_cpu = 0

    def factory(original):
        def made_on_cpu(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
                report.cuda_on_cpu += 1
            return original(*args, **kwargs)
        return made_on_cpu

    def stay(obj, *args, **kwargs):
        report.cuda_on_cpu += 1
        return obj

    with contextlib.ExitStack() as stack:
        for name in CUDA_FACTORIES:
            stack.enter_context(_attribute(torch, name, factory(getattr(torch, name))))
        stack.enter_context(_attribute(torch.Tensor, "cuda", stay))
        stack.enter_context(_attribute(torch.nn.Module, "cuda", stay))
        yield


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _gic_hooks(stack: contextlib.ExitStack, report: RunReport, calibrator, shape, reserved_type: str | None,
               script: str) -> None:
    """Install the data hooks in their already imported modules (see the module docstring)."""
    drawn = calibrator if isinstance(calibrator, DrawnFit) else None
    base = getattr(sys.modules.get("defense.base"), "defense", None)
    if base is not None and hasattr(base, "get_reserved_data"):  # BackdoorBenchER: every type goes through it
        _hook_reserved(stack, report, calibrator, drawn, shape, base, reserved_type)
        return
    if reserved_type not in TRAIN_TYPES:
        raise BBRunError(f"--reserved_type {reserved_type}: this checkout's defense/base.py has no get_reserved_data "
                         "(upstream BackdoorBench draws only the clean training set; drop --reserved_type)")
    sla = sys.modules.get("utils.save_load_attack")
    if sla is None or not hasattr(sla, "load_attack_result"):
        raise BBRunError("this checkout's utils/save_load_attack.py has no load_attack_result; bb-run --gic needs it")
    original = sla.load_attack_result

    def load_attack_result(*args, **kwargs):
        result = original(*args, **kwargs)
        clean = result.get("clean_train") if isinstance(result, dict) else None
        if clean is None or not hasattr(clean, "wrapped_dataset"):
            return result  # a defense_result.pt read through the same function: no data to calibrate
        if not isinstance(clean.wrapped_dataset, CalibratedImages):
            clean.wrapped_dataset = CalibratedImages(clean.wrapped_dataset, calibrator, shape)
            report.note_calibrated("load_attack_result()['clean_train']", len(clean.wrapped_dataset),
                                   clean.wrapped_dataset)
        return result

    stack.enter_context(_attribute(sla, "load_attack_result", load_attack_result))
    ci = sys.modules.get("utils.choose_index")
    if drawn is None or ci is None or not hasattr(ci, "choose_index"):
        return
    original_choose = ci.choose_index

    def choose_index(args, *rest, **kwargs):
        idx = original_choose(args, *rest, **kwargs)
        index = getattr(args, "index", None)
        how = f"the --index file {index}" if index else f"their seeded draw, random_seed {getattr(args, 'random_seed', '?')}"
        drawn.on_positions(idx, f"the clean training images {script} drew (choose_index: {how})")
        return idx

    stack.enter_context(_attribute(ci, "choose_index", choose_index))


def _hook_reserved(stack, report, calibrator, drawn, shape, base, reserved_type) -> None:
    original_get = base.get_reserved_data

    def get_reserved_data(self, *args, **kwargs):
        out = original_get(self, *args, **kwargs)
        inner = getattr(out, "wrapped_dataset", None)
        if inner is None:
            raise BBRunError("get_reserved_data returned a dataset without wrapped_dataset; bb-run cannot find its "
                             "raw images to calibrate")
        rtype = kwargs.get("reserved_type", args[1] if len(args) > 1 else reserved_type)
        if not isinstance(inner, CalibratedImages):
            if drawn is not None:
                index = getattr(getattr(self, "args", None), "index", None)
                how = f"the --index file {index}" if index else "their seeded draw"
                drawn.on_images(images_of(inner, shape, f"get_reserved_data() [{rtype}]"),
                                f"the images get_reserved_data() [{rtype}] returned ({how}), what {drawn.script} "
                                "trains on")
            out.wrapped_dataset = CalibratedImages(inner, calibrator, shape)
            report.note_calibrated(f"get_reserved_data() [{rtype}]", len(out.wrapped_dataset), out.wrapped_dataset)
        return out

    stack.enter_context(_attribute(base, "get_reserved_data", get_reserved_data))


@contextlib.contextmanager
def _their_process_state(root: Path, script: Path, argv: list[str]) -> Iterator[None]:
    """cwd = checkout root, sys.argv = their command line, sys.path as ``python <script>`` from the root makes it
    (the script's folder first: analysis/visual_metric.py imports its sibling visual_utils) with the root next,
    their modules and root log handlers dropped afterwards, everything else restored."""
    top_level = {p.stem if p.suffix == ".py" else p.name for folder in {root, script.parent} for p in folder.iterdir()
                 if (p.is_dir() and not p.name.startswith(".")) or p.suffix == ".py"}
    shadowed = {k: v for k, v in sys.modules.items() if k.split(".")[0] in top_level}
    for k in shadowed:
        del sys.modules[k]
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    rootlog = logging.getLogger()
    saved_handlers, saved_level = rootlog.handlers[:], rootlog.level
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script)] + list(argv)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        sys.path[:] = saved_path
        for h in rootlog.handlers[:]:
            if h not in saved_handlers:
                rootlog.removeHandler(h)
                with contextlib.suppress(Exception):
                    h.close()
        rootlog.setLevel(saved_level)
        for k in [k for k in sys.modules if k.split(".")[0] in top_level]:
            del sys.modules[k]  # imported during the run (the shadowed ones were taken out before it)
        sys.modules.update(shadowed)


def resolve_script(script: str | os.PathLike, root: Path) -> Path:
    p = Path(script)
    for candidate in ([p] if p.is_absolute() else [root / p, Path.cwd() / p]):
        if candidate.is_file():
            return candidate.resolve()
    raise BBRunError(f"no script {script} under {root} (name it relative to the checkout, e.g. defense/ft.py)")


def run_script(script: str | os.PathLike, argv: list[str], bb_root: str | os.PathLike, *,
               calibrator: Callable[[torch.Tensor], torch.Tensor] | None = None,
               image_shape: tuple[int, int, int] | None = None, reserved_type: str | None = None,
               numpy_aliases: bool = True, cuda_to_cpu: bool = False) -> RunReport:
    """Run ``script`` (a path in the checkout ``bb_root``) as ``python script argv...`` from the checkout root,
    with the allow-list loader and, given a ``calibrator`` (N x C x H x W -> same, on the CPU) and the (C, H, W)
    ``image_shape`` it was fitted at, GIC in front of the clean images it draws; ``cuda_to_cpu``: the CUDA-on-CPU
    shim (module docstring)."""
    root = Path(bb_root).resolve()
    try:
        flavour = detect_checkout(root)
    except ValueError as exc:
        raise BBRunError(str(exc)) from None
    path = resolve_script(script, root)
    report = RunReport(flavour, path)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_their_process_state(root, path, argv))
        stack.enter_context(allowlisted_torch_load(report))
        stack.enter_context(numpy_compat(report, numpy_aliases))
        stack.enter_context(cuda_on_cpu(report, cuda_to_cpu))
        if calibrator is not None:
            if image_shape is None:
                raise BBRunError("image_shape is needed with a calibrator")
            try:
                import utils.save_load_attack  # noqa: F401  (theirs, from the checkout)
                if (root / "defense" / "base.py").is_file() or reserved_type not in TRAIN_TYPES:
                    import defense.base  # noqa: F401
                if (root / "utils" / "choose_index.py").is_file():
                    import utils.choose_index  # noqa: F401
            except ImportError as exc:
                raise BBRunError(f"importing the checkout's modules failed ({exc}); install BackdoorBench's "
                                 "requirements in this environment") from exc
            _gic_hooks(stack, report, calibrator, image_shape, reserved_type, path.name)
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            code = exc.code
            report.exit_code = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(calibrator, DrawnFit):
        report.fits = list(calibrator.lines)
    report.settle()
    if calibrator is not None and not report.calibrated and report.exit_code == 0:
        raise BBRunError(f"{path.name} never read a clean training image drawn through load_attack_result or "
                         "get_reserved_data, so GIC had nothing to calibrate")
    return report
