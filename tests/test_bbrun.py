"""bbgic bb-run on BackdoorBench-shaped checkouts made here (CI cannot fetch BackdoorBench).

The fake checkout has their marker paths and stand-ins for the pieces bb-run relies on, written for this test
(none of their code): ``utils/save_load_attack.py`` whose ``load_attack_result`` calls ``torch.load`` bare (as theirs
does, which torch >= 2.6 refuses for every record) and returns raw ``(PIL image, label)`` datasets inside
``dataset_wrapper_with_transform``; ``defense/base.py`` (with BackdoorBenchER's ``get_reserved_data`` in the ER
flavour); and ``defense/ft.py``, a defense that draws its clean subset as theirs do and records every image it
was given, plus the test images, in ``record/<r>/defense/ft/seen.npz``. It also spells ``np.infty``, as their plot
helper does.
"""
from __future__ import annotations

import logging
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoorbench_gic import bbrun, cli, testing
from backdoorbench_gic.commands.bb_run import flag_value, split_gic_flags
from backdoorbench_gic.data.transforms import nchw_to_nhwc_uint8
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.testing import make_bb_record

RECORD = "badnet_bb"
GIC_FLAGS = ["--gic_steps", "8", "--delta", "0.0627", "--family", "prompt"]

SAVE_LOAD_ATTACK = '''
import os
import pickle

import numpy as np
import torch
from PIL import Image

from utils.bd_dataset_v2 import dataset_wrapper_with_transform


class RawCifar:
    """(PIL image, label) from CIFAR batch pickles, like torchvision's dataset without transform."""

    def __init__(self, folder, files):
        xs, ys = [], []
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
            xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys += [int(v) for v in d["labels"]]
        self.x, self.y = np.concatenate(xs), ys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return Image.fromarray(self.x[i]), self.y[i]


class RawFolder:
    """ImageFolder order: class folders sorted, then file names."""

    def __init__(self, root):
        self.items = [(os.path.join(root, c, f), int(c)) for c in sorted(os.listdir(root))
                      for f in sorted(os.listdir(os.path.join(root, c)))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, y = self.items[i]
        with Image.open(path) as img:
            return img.convert("RGB"), y


class BdSet(RawFolder):
    """The poisoned PNGs of a record, in its original_index_array order."""

    def __init__(self, root, state):
        data = state["bd_data_container"]["data_dict"]
        self.items = [(os.path.join(root, data[i]["path"]), data[i]["other_info"][0]) for i in state["original_index_array"]]


def load_attack_result(save_path):
    load_file = torch.load(save_path)
    save_path = os.path.realpath(save_path)
    root = save_path[:save_path.index("record")]
    data = root + load_file["data_path"][load_file["data_path"].index("data"):]
    if os.path.isdir(os.path.join(data, "train")):
        train, test = RawFolder(os.path.join(data, "train")), RawFolder(os.path.join(data, "test"))
    else:
        folder = os.path.join(data, "cifar-10-batches-py")
        train = RawCifar(folder, ["data_batch_%d" % i for i in range(1, 6)])
        test = RawCifar(folder, ["test_batch"])
    return {"model_name": load_file["model_name"], "model": load_file["model"],
            "clean_train": dataset_wrapper_with_transform(train), "clean_test": dataset_wrapper_with_transform(test),
            "bd_train": None, "bd_test": dataset_wrapper_with_transform(BdSet(root, load_file["bd_test"]))}
'''

BD_DATASET_V2 = '''
import torch


class dataset_wrapper_with_transform(torch.utils.data.Dataset):
    def __init__(self, obj, wrap_img_transform=None):
        self.wrapped_dataset = obj
        self.wrap_img_transform = wrap_img_transform

    def __getattr__(self, attr):
        if attr == "wrapped_dataset":
            raise AttributeError(attr)
        return getattr(self.wrapped_dataset, attr)

    def __getitem__(self, index):
        img, label, *rest = self.wrapped_dataset[index]
        if self.wrap_img_transform is not None:
            img = self.wrap_img_transform(img)
        return (img, label, *rest)

    def __len__(self):
        return len(self.wrapped_dataset)
'''

BASE = '''
class defense(object):
    pass
'''

BASE_ER = '''
import os

import numpy as np
import torch

from utils.bd_dataset_v2 import dataset_wrapper_with_transform
from utils.save_load_attack import RawFolder


class defense(object):
    def get_reserved_data(self, train_tran, reserved_type):
        if reserved_type == "train":
            raw = self.result["clean_train"].wrapped_dataset
        else:
            raw = RawFolder(os.path.join(self.args.dataset_path, reserved_type))
        n = int(self.args.ratio * len(self.result["clean_train"]))
        idx = np.random.RandomState(self.args.random_seed).permutation(len(raw))[:n]
        return dataset_wrapper_with_transform(torch.utils.data.Subset(raw, idx.tolist()), train_tran)
'''

FT = '''
import argparse
import os
import sys

import numpy as np
import torch
import yaml

sys.path.append(os.getcwd())
from defense.base import defense
from utils.choose_index import choose_index
from utils.save_load_attack import load_attack_result


class ft(defense):
    def __init__(self, args):
        with open(args.yaml_path) as f:
            merged = yaml.safe_load(f)
        merged.update({k: v for k, v in args.__dict__.items() if v is not None})
        args.__dict__ = merged
        args.dataset_path = args.dataset_path + "/" + args.dataset
        self.args = args

    def defense(self, result_file):
        self.result = load_attack_result("record/" + result_file + "/attack_result.pt")
        a = self.args
        if hasattr(self, "get_reserved_data"):
            data = self.get_reserved_data(None, a.reserved_type)
            idx = np.asarray(data.wrapped_dataset.indices)
        else:
            raw = self.result["clean_train"].wrapped_dataset
            np.random.seed(a.random_seed)
            idx = choose_index(a, len(raw))
            data = torch.utils.data.Subset(raw, idx.tolist())
        clean = np.stack([np.asarray(data[i][0]) for i in range(len(data))])
        test = self.result["clean_test"]
        bd = self.result["bd_test"]
        out = "record/" + result_file + "/defense/ft/"
        os.makedirs(out, exist_ok=True)
        np.savez(out + "seen.npz", clean=clean, clean_idx=idx,
                 test=np.stack([np.asarray(test[i][0]) for i in range(len(test))]),
                 bd=np.stack([np.asarray(bd[i][0]) for i in range(len(bd))]), bound=np.infty)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--result_file", "--yaml_path", "--dataset", "--device", "--reserved_type", "--index"):
        parser.add_argument(flag, type=str)
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--random_seed", type=int)
    args = parser.parse_args()
    ft(args).defense(args.result_file)
'''


CHOOSE_INDEX = '''
import numpy as np


def choose_index(args, data_all_length):
    """The --index file's positions, else a seeded draw of ratio x length positions (their interface)."""
    if getattr(args, "index", None):
        return np.loadtxt(args.index, dtype=int)
    return np.sort(np.random.choice(np.arange(data_all_length), int(data_all_length * args.ratio), replace=False))
'''


def make_checkout(root: Path, er: bool = False, **record) -> Path:
    """A stand-in BackdoorBench (``er``: BackdoorBenchER) checkout; ``record``: :func:`testing.make_checkout`'s."""
    files = {
        "utils/__init__.py": "", "utils/save_load_attack.py": SAVE_LOAD_ATTACK, "utils/bd_dataset_v2.py": BD_DATASET_V2,
        "utils/choose_index.py": CHOOSE_INDEX,
        "defense/__init__.py": "", "defense/base.py": BASE_ER if er else BASE, "defense/ft.py": FT,
        "config/defense/ft/config.yaml": "ratio: 0.2\nrandom_seed: 0\ndevice: cpu\ndataset_path: ./data\n"
                                         + ("reserved_type: train\n" if er else ""),
        "attack/README": "stand-in\n",
    }
    if er:
        files["defense/fst.py"] = "# stand-in\n"
    return testing.make_checkout(root, {rel: textwrap.dedent(text) for rel, text in files.items()}, **record)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def private_gic_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "gic_cache"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return make_checkout(tmp_path_factory.mktemp("bb") / "BackdoorBench", record=RECORD, n_train=100, n_test=30)


def bbgic(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def seen(root: Path, record: str = RECORD) -> dict[str, np.ndarray]:
    with np.load(root / "record" / record / "defense" / "ft" / "seen.npz") as z:
        return {k: z[k] for k in z.files}


def expected_calibrated(calibrator, images_nhwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        y = calibrator(x)
    return y.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def refit(root: Path, images, seed: int = 0, indices=None):
    """The g bb-run fitted on ``images`` (uint8 N x H x W x C with labels; ``indices``: their positions in the
    dataset they were drawn from, as the fitted set records them), from the GIC cache: a cache hit proves bb-run
    fitted on exactly these images with these settings."""
    from backdoorbench_gic.data.imageset import ImageSet

    rec = load_attack_record(RECORD, root)
    x, y = images
    aux = ImageSet(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y),
                   indices=indices)
    settings = {k.lstrip("-"): v for k, v in zip(GIC_FLAGS[::2], GIC_FLAGS[1::2])}
    cal, _, info = bbrun.fit_gic(rec, aux, settings=settings, seed=seed, device="cpu")
    assert info["gic_cached"] == 1.0  # bb-run's own fit, not a new one
    return rec, cal


def test_runs_their_script_with_the_allowlist_loader_and_restores_everything(upstream, capsys):
    load_before, path_before, cwd_before = torch.load, sys.path[:], os.getcwd()
    handlers_before = logging.getLogger().handlers[:]
    code, out = bbgic(capsys, "bb-run", "defense/ft.py", "--bb_root", upstream, "--result_file", RECORD,
                      "--yaml_path", "./config/defense/ft/config.yaml", "--dataset", "cifar10")
    assert code == 0, out
    assert "1 torch.load call(s) through the allow-list" in out and "GIC" not in out
    assert "np.infty" in out  # numpy 2 removed it; their plot helper spells it
    s = seen(upstream)
    rec = load_attack_record(RECORD, upstream)
    raw = nchw_to_nhwc_uint8(rec.clean_train.images)
    assert len(s["clean_idx"]) == 20 and np.array_equal(s["clean"], raw[s["clean_idx"]])
    assert np.array_equal(s["test"], nchw_to_nhwc_uint8(rec.clean_test.images))
    assert np.array_equal(s["bd"], nchw_to_nhwc_uint8(rec.bd_test.images))
    # nothing of the run is left behind
    assert torch.load is load_before and sys.path == path_before and os.getcwd() == cwd_before
    assert logging.getLogger().handlers == handlers_before
    assert not hasattr(np, "infty") or np.__version__.startswith("1.")
    assert not any(m == "utils" or m.startswith(("utils.", "defense")) for m in sys.modules)


def test_gic_calibrates_the_clean_images_it_draws_and_never_the_test_data(upstream, capsys):
    code, out = bbgic(capsys, "bb-run", "defense/ft.py", "--bb_root", upstream, "--result_file", RECORD,
                      "--yaml_path", "./config/defense/ft/config.yaml", "--dataset", "cifar10", "--gic", *GIC_FLAGS)
    assert code == 0, out
    assert ("GIC: g fitted through the victim of badnet_bb on the clean training images ft.py drew (choose_index: "
            "their seeded draw, random_seed 0) (20 images)") in out
    assert "GIC calibrated load_attack_result()['clean_train'] (100 images)" in out
    s = seen(upstream)
    rec = load_attack_record(RECORD, upstream)
    raw = nchw_to_nhwc_uint8(rec.clean_train.images)[s["clean_idx"]]
    # g saw exactly what ft.py drew: those images, at those positions of clean_train
    idx = s["clean_idx"]
    _, cal = refit(upstream, (raw, rec.clean_train.labels[idx]), indices=rec.clean_train.indices[idx])
    assert np.array_equal(s["clean"], expected_calibrated(cal, raw))
    diff = np.abs(s["clean"].astype(int) - raw.astype(int))
    assert diff.max() > 0 and diff.max() <= round(0.0627 * 255) + 1  # moved, within the budget (+ rounding)
    assert np.array_equal(s["test"], nchw_to_nhwc_uint8(rec.clean_test.images))
    assert np.array_equal(s["bd"], nchw_to_nhwc_uint8(rec.bd_test.images))


def test_a_malicious_record_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    root = make_checkout(tmp_path / "BackdoorBench")
    record = make_bb_record(root, "evil", n_train=20, n_test=10, model_name="smallcnn", width=8)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = torch.load(record / "attack_result.pt", weights_only=False)  # our own fixture, to graft the payload on
    good["bd_test"]["bd_data_container"]["payload"] = Payload()
    torch.save(good, record / "attack_result.pt")
    for extra in ([], ["--gic"]):
        code, out = bbgic(capsys, "bb-run", "defense/ft.py", "--bb_root", root, "--result_file", "evil",
                          "--yaml_path", "./config/defense/ft/config.yaml", "--dataset", "cifar10", *extra)
        assert code == 2 and "refused" in out and "pickle global(s) posix.system" in out and "none of it ran" in out, out
        assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"


def test_backdoorbench_er_reserved_type_calibrates_what_get_reserved_data_returns(tmp_path, capsys):
    from backdoorbench_gic.testing import make_split_record

    root = make_checkout(tmp_path / "BackdoorBenchER", er=True)
    make_split_record(root, RECORD, n_train=100, n_test=30, train_steps=10, width=8, split_ratio=0.4)
    rec = load_attack_record(RECORD, root)
    split = rec.clean_data
    code, out = bbgic(capsys, "bb-run", "defense/ft.py", "--bb_root", root, "--result_file", RECORD, "--dataset", split,
                      "--yaml_path", "./config/defense/ft/config.yaml", "--reserved_type", "reserved", "--ratio", "0.3",
                      "--gic", *GIC_FLAGS)
    assert code == 0, out
    assert "GIC calibrated get_reserved_data() [reserved]" in out and "clean_train" not in out
    assert "on the images get_reserved_data() [reserved] returned (their seeded draw), what ft.py trains on" in out
    s = seen(root)
    reserved_set = rec.dataset().split("reserved")
    reserved = nchw_to_nhwc_uint8(reserved_set.images)[s["clean_idx"]]
    _, cal = refit(root, (reserved, reserved_set.labels[s["clean_idx"]]))
    assert np.array_equal(s["clean"], expected_calibrated(cal, reserved))
    assert not np.array_equal(s["clean"], reserved)
    assert np.array_equal(s["test"], nchw_to_nhwc_uint8(rec.clean_test.images))


def test_requests_that_cannot_work_fail_before_their_script_runs(upstream, capsys):
    base = ["bb-run", "defense/ft.py", "--bb_root", upstream, "--result_file", RECORD, "--dataset", "cifar10"]
    code, out = bbgic(capsys, *base, "--delta", "0.1")
    assert code == 2 and "--delta" in out and "without --gic" in out
    code, out = bbgic(capsys, *base, "--gic", "--reserved_type", "reserved")
    assert code == 2 and "upstream BackdoorBench has no reserved types" in out
    code, out = bbgic(capsys, "bb-run", "defense/nope.py", "--bb_root", upstream, "--result_file", RECORD)
    assert code == 2 and "no script defense/nope.py" in out
    code, out = bbgic(capsys, "bb-run", "defense/ft.py", "--bb_root", upstream / "record", "--result_file", RECORD)
    assert code == 2 and "does not look like a BackdoorBench checkout" in out


def test_flag_helpers():
    ours, theirs = split_gic_flags(["--result_file", "r", "--delta=0.1", "-pm", "True", "--gic_steps", "5", "--x"],
                                   {"delta", "gic_steps"})
    assert ours == {"delta": "0.1", "gic_steps": "5"} and theirs == ["--result_file", "r", "-pm", "True", "--x"]
    assert flag_value(["--ratio", "0.1", "--ratio=0.2"], "ratio") == "0.2"
    assert flag_value(["--ratio_x", "1"], "ratio") is None


def test_calibrated_images_keep_type_and_size():
    from PIL import Image

    shift = lambda x: (x + 10 / 255).clamp(0, 1)  # noqa: E731
    pil = Image.fromarray(np.full((40, 36, 3), 100, np.uint8))  # GTSRB-like raw size: resized to g's 32 x 32
    view = bbrun.CalibratedImages([(pil, 3)], shift, (3, 32, 32))
    img, label = view[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and label == 3
    assert np.asarray(img).min() == 110 and np.asarray(img).max() == 110
    arr_view = bbrun.CalibratedImages([(np.full((32, 32, 3), 250, np.uint8), 1, 7)], shift, (3, 32, 32))
    out = arr_view[0]
    assert out[1:] == (1, 7) and out[0].dtype == np.uint8 and int(out[0].max()) == 255  # clipped to [0,1]
    t = torch.full((3, 32, 32), 0.5)
    assert torch.allclose(bbrun.CalibratedImages([(t, 0)], shift, (3, 32, 32))[0][0], t + 10 / 255)


CUDA_ONLY = '''
import torch

x = torch.zeros_like(torch.ones(2, 3), device="cuda")  # as i-bau.py:496 does, whatever --device says
y = torch.ones(4, device=torch.device("cuda:0")).cuda()
net = torch.nn.Linear(3, 1).cuda()
assert x.device.type == y.device.type == next(net.parameters()).device.type == "cpu"
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim serves machines without CUDA")
def test_cuda_on_cpu_serves_hard_coded_cuda_requests_on_the_cpu_and_is_undone(tmp_path, capsys):
    root = make_checkout(tmp_path / "BackdoorBench")
    (root / "defense" / "cudaonly.py").write_text(CUDA_ONLY)
    originals = {name: getattr(torch, name) for name in bbrun.CUDA_FACTORIES}
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    code, out = bbgic(capsys, "bb-run", "defense/cudaonly.py", "--bb_root", root)
    assert code == 1 and "failed (traceback above, from their code)" in out  # CUDA is not there
    code, out = bbgic(capsys, "bb-run", "defense/cudaonly.py", "--bb_root", root, "--cuda_on_cpu")
    assert code == 0, out
    assert "CUDA on the CPU: 4 CUDA request(s) of their code served on the CPU" in out
    assert all(getattr(torch, name) is f for name, f in originals.items())
    assert torch.Tensor.cuda is tensor_cuda and torch.nn.Module.cuda is module_cuda
    assert "cuda" not in vars(torch.Tensor)  # the shim's override is removed, not left as an attribute


def test_a_fit_that_starts_inside_no_grad_code_still_has_gradients(upstream):
    # upstream npd.py reads every clean image (choose_by_class) before drawing: g is then fitted on our fallback
    # draw at the first image, i.e. inside CalibratedImages' torch.no_grad() (or their own); the fit needs autograd
    rec = load_attack_record(RECORD, upstream)
    grad_enabled = []

    def fit(images):
        grad_enabled.append(torch.is_grad_enabled())
        return (lambda x: x), "identity"

    drawn = bbrun.DrawnFit(rec, fit, "npd.py", lambda: rec.clean_train.subset(range(4), name="clean_train"),
                           announce=lambda line: None)
    view = bbrun.CalibratedImages([(np.zeros((32, 32, 3), np.uint8), 0)], drawn, (3, 32, 32))
    with torch.no_grad():
        view[0]
    assert grad_enabled == [True] and "our own draw" in drawn.lines[0]


DATA_FREE = '''
import os
import sys

sys.path.append(os.getcwd())
from utils.save_load_attack import load_attack_result

result = load_attack_result("record/badnet_bb/attack_result.pt")  # loads the record, reads no clean image (clp.py)
'''


def test_gic_is_refused_when_their_script_reads_no_clean_image(upstream, capsys):
    (upstream / "defense" / "datafree.py").write_text(DATA_FREE)
    code, out = bbgic(capsys, "bb-run", "defense/datafree.py", "--bb_root", upstream, "--result_file", RECORD, "--gic",
                      *GIC_FLAGS)
    assert code == 2 and "never read a clean training image" in out and "GIC calibrated" not in out, out
    code, out = bbgic(capsys, "bb-run", "defense/datafree.py", "--bb_root", upstream)
    assert code == 0, out
