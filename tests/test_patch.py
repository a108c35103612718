"""bbgic patch (install / --check / --remove) and bbgic calibrate on a fake BackdoorBench checkout made here.

The checkout has BackdoorBench's marker paths, a few stand-in files of theirs, a BackdoorBench-format record
and ``data/``. The installed ``defense/gic.py`` runs as a subprocess from the checkout root, as a user runs it,
and its results must appear in BackdoorBench's layout; ``--remove`` must leave the tree byte for byte as it was.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import backdoorbench_gic
from backdoorbench_gic import cli, patching, testing
from backdoorbench_gic.auxdata import build_aux_set
from backdoorbench_gic.records import load_attack_record

REPO_ROOT = Path(backdoorbench_gic.__file__).resolve().parent.parent
RECORD = "badnet_r"
# what the fake checkout holds besides the markers: stand-ins for a few of BackdoorBench's own files
THEIR_FILES = {
    "attack/badnet.py": "# stand-in for BackdoorBench's attack script\n",
    "defense/ft.py": "# stand-in for BackdoorBench's ft defense\n",
    "defense/base.py": "# stand-in\n",
    "config/defense/ft/cifar10.yaml": "epochs: 100\n",
    "utils/save_load_attack.py": "# stand-in for the bridge format module\n",
    "sh/init_folders.sh": "mkdir -p record data\n",
}


def make_checkout(root: Path, files: dict[str, str] = THEIR_FILES, **record) -> Path:
    for marker in ("attack", "defense", "config/defense"):
        (root / marker).mkdir(parents=True, exist_ok=True)
    return testing.make_checkout(root, files, **record)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root: relative path -> (kind, permissions, sha256 of the content)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            mode = stat.S_IMODE(p.lstat().st_mode)
            if p.is_dir():
                out[rel] = ("dir", mode, None)
            else:
                out[rel] = ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def bbgic(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stdout + stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def bb_checkout(tmp_path_factory):
    """A fake checkout with a BackdoorBench-format record (random-ish small CNN, 200 train / 40 test images)."""
    return make_checkout(tmp_path_factory.mktemp("bbcheckout") / "BackdoorBench", record=RECORD, n_train=200,
                         n_test=40)


@pytest.fixture(autouse=True)
def private_gic_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "gic_cache"))


# ---------------------------------------------------------------------------------------------------------
# install / check / remove
# ---------------------------------------------------------------------------------------------------------
def test_refuses_a_non_checkout_and_names_the_missing_markers(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = bbgic(capsys, "patch", empty)
    assert code != 0
    for marker in patching.MARKERS:
        assert marker in out
    assert list(empty.iterdir()) == []

    partial = tmp_path / "partial"  # attack/ and defense/ only
    (partial / "attack").mkdir(parents=True)
    (partial / "defense").mkdir()
    before = snapshot(partial)
    code, out = bbgic(capsys, "patch", partial)
    assert code != 0
    missing = re.search(r"checkout: missing (.*?) \(expected", out).group(1)
    assert "config/defense" in missing and "utils/save_load_attack.py" in missing
    assert "attack" not in missing.replace("save_load_attack", "")
    assert snapshot(partial) == before
    for mode in ("--check", "--remove"):
        code, out = bbgic(capsys, "patch", partial, mode)
        assert code != 0 and "utils/save_load_attack.py" in out


def test_install_check_remove_restores_the_tree_exactly(tmp_path, capsys):
    root = make_checkout(tmp_path / "bb")
    before = snapshot(root)
    code, out = bbgic(capsys, "patch", root)
    assert code == 0, out
    assert "python defense/gic.py --result_file" in out  # the command to run next
    files = patching.patch_files()
    assert {"defense/gic.py", "config/defense/gic/config.yaml"} <= set(files)
    assert {f"config/defense/gic/{d}.yaml" for d in ("config", "cifar10", "cifar100", "gtsrb", "tiny")} <= set(files)
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data
        mode = stat.S_IMODE((root / rel).stat().st_mode)
        assert mode == (0o755 if rel.endswith(".py") else 0o644), (rel, oct(mode))
    for rel in THEIR_FILES:  # their files untouched
        assert before[rel] == snapshot(root)[rel]

    code, out = bbgic(capsys, "patch", root, "--check")
    assert code == 0 and "intact" in out
    code, out = bbgic(capsys, "patch", root)  # installing again changes nothing
    assert code == 0 and "wrote" not in out and out.count("current") == len(files)

    code, out = bbgic(capsys, "patch", root, "--remove")
    assert code == 0, out
    assert snapshot(root) == before
    code, out = bbgic(capsys, "patch", root, "--check")
    assert code != 0 and "no GIC installation" in out


def test_check_names_a_modified_or_missing_file(tmp_path, capsys):
    root = make_checkout(tmp_path / "bb")
    before = snapshot(root)
    assert bbgic(capsys, "patch", root)[0] == 0
    edited = root / "config/defense/gic/cifar10.yaml"
    edited.write_text(edited.read_text() + "gic_steps: 7\n")
    code, out = bbgic(capsys, "patch", root, "--check")
    assert code != 0
    assert re.search(r"PROBLEM\s+config/defense/gic/cifar10\.yaml was modified", out), out
    assert "defense/gic.py" in out and "PROBLEM  defense/gic.py" not in out  # the intact file is not blamed

    # neither a reinstall nor a removal silently discards the edit
    code, out = bbgic(capsys, "patch", root)
    assert code != 0 and "cifar10.yaml" in out and "--force" in out
    code, out = bbgic(capsys, "patch", root, "--remove")
    assert code != 0 and "cifar10.yaml" in out and "--force" in out
    assert "gic_steps: 7" in edited.read_text()

    (root / "defense/gic.py").unlink()
    code, out = bbgic(capsys, "patch", root, "--check")
    assert code != 0 and re.search(r"PROBLEM\s+defense/gic\.py is missing", out), out

    code, out = bbgic(capsys, "patch", root, "--remove", "--force")
    assert code == 0, out
    assert snapshot(root) == before


def test_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    root = make_checkout(tmp_path / "bb", {**THEIR_FILES, "defense/gic.py": "# somebody else's gic\n"})
    before = snapshot(root)
    code, out = bbgic(capsys, "patch", root)
    assert code != 0
    assert "defense/gic.py" in out and "--force" in out
    assert snapshot(root) == before  # nothing written, no manifest

    code, out = bbgic(capsys, "patch", root, "--force")
    assert code == 0, out
    assert (root / "defense/gic.py").read_bytes() == patching.patch_files()["defense/gic.py"]
    assert bbgic(capsys, "patch", root, "--check")[0] == 0


# ---------------------------------------------------------------------------------------------------------
# the git-apply patch
# ---------------------------------------------------------------------------------------------------------
def test_committed_patch_file_is_current():
    committed = REPO_ROOT / "patches" / "backdoorbench-gic.patch"
    assert patching.patch_file_path() == committed
    text = committed.read_text(encoding="utf-8")
    assert text == patching.unified_patch(), "patches/backdoorbench-gic.patch is stale: run `bbgic patch --write-patch`"
    # new files only, exactly the ones bbgic patch installs
    added = re.findall(r"^diff --git a/(\S+) b/\1\nnew file mode 100(?:644|755)\n--- /dev/null\n\+\+\+ b/\1\n", text, re.M)
    assert added == list(patching.patch_files())
    assert text.count("diff --git") == len(added)


def test_git_apply_adds_the_same_files_to_an_unpatched_tree(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    root = make_checkout(tmp_path / "bb")
    patch = REPO_ROOT / "patches" / "backdoorbench-gic.patch"
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # never walk up into an enclosing repository
    run = lambda *args: subprocess.run([git, "apply", *args, str(patch)], cwd=root, env=env,  # noqa: E731
                                       capture_output=True, text=True)
    checked = run("--check")
    assert checked.returncode == 0, checked.stderr
    applied = run()
    assert applied.returncode == 0, applied.stderr
    for rel, data in patching.patch_files().items():
        assert (root / rel).read_bytes() == data
        assert bool((root / rel).stat().st_mode & stat.S_IXUSR) == rel.endswith(".py"), rel
    again = run("--check")  # it only adds files: a second application is refused
    assert again.returncode != 0 and "already exists" in again.stderr


# ---------------------------------------------------------------------------------------------------------
# defense/gic.py from the checkout root, as BackdoorBench users run their defenses
# ---------------------------------------------------------------------------------------------------------
def test_defense_script_writes_backdoorbench_layout_and_remove_restores(bb_checkout, capsys, tmp_path):
    root = bb_checkout
    before = snapshot(root)
    code, out = bbgic(capsys, "patch", root)
    assert code == 0, out
    assert bbgic(capsys, "patch", root, "--check")[0] == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BBGIC_CACHE_DIR": str(tmp_path / "gic_cache"),
           "BBGIC_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "defense/gic.py", "--result_file", RECORD, "--dataset", "cifar10", "--reserved_type", "train",
         "--device", "cpu", "--gic_steps", "3", "--epochs", "1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"gic-ft on {RECORD} with train" in proc.stdout

    # record/<R>/defense/gic-<base>/<yaml name>/ (no --yaml_path: config/defense/gic/config.yaml)
    out_dir = root / "record" / RECORD / "defense" / "gic-ft" / "config"
    assert out_dir.is_dir(), sorted(p.relative_to(root).as_posix() for p in (root / "record" / RECORD).rglob("*"))
    result = torch.load(out_dir / "defense_result.pt", map_location="cpu", weights_only=True)
    assert set(result) == {"model_name", "num_classes", "model"}
    record = load_attack_record(RECORD, root)
    assert result["model_name"] == "smallcnn" and result["num_classes"] == 10
    model = record.build_model()
    model.net.load_state_dict(result["model"])  # strict: the same architecture, purified weights

    metric_cols = {"epoch", "test_acc", "test_asr", "test_ra"}
    per_epoch = pd.read_csv(out_dir / "gic-ft_df.csv", index_col=0)
    assert metric_cols <= set(per_epoch.columns) and len(per_epoch) == 1
    summary = pd.read_csv(out_dir / "gic-ft_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    assert metric_cols <= set(summary.columns)
    assert all(0.0 <= summary.loc["last", k] <= 1.0 for k in ("test_acc", "test_asr", "test_ra"))

    assert (out_dir / "checkpoint").is_dir()
    logs = [p.name for p in (out_dir / "log").iterdir()]
    assert any(re.fullmatch(r"\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.log", n) for n in logs), logs
    index = [int(line) for line in (out_dir / "log" / "index.txt").read_text().split()]
    assert len(index) == 10 and len(set(index)) == 10 and all(0 <= i < 200 for i in index)  # ratio 0.05 of 200

    # removal takes out exactly what bbgic patch added; the defense's results stay in their BackdoorBench folder
    # record/<R>/defense/<name>/, and nothing else is written into the record (caches live in the cache directory)
    code, out = bbgic(capsys, "patch", root, "--remove")
    assert code == 0, out
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    added = set(after) - set(before)
    assert added and all(k == f"record/{RECORD}/defense" or k.startswith(f"record/{RECORD}/defense/")
                         for k in added), sorted(added)
    assert not any(k.startswith(("defense/", "config/")) for k in added)


# ---------------------------------------------------------------------------------------------------------
# bbgic calibrate: BackdoorBenchER's _vp arrays
# ---------------------------------------------------------------------------------------------------------
def test_calibrate_writes_vp_arrays_that_the_vp_source_reads_back(bb_checkout, capsys):
    root = bb_checkout
    code, out = bbgic(capsys, "calibrate", "--bb_root", root, "--result_file", RECORD, "--dataset", "cifar10",
                      "--reserved_type", "train", "--device", "cpu", "--gic_steps", "3")
    assert code == 0, out
    folder = root / "data" / "cifar10" / "train_vp" / RECORD
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npy"]
    images = np.load(folder / "images.npy", allow_pickle=False)
    labels = np.load(folder / "labels.npy", allow_pickle=False)

    record = load_attack_record(RECORD, root)
    h, w, c = record.img_size
    assert images.dtype == np.float32 and images.shape == (200, h, w, c) == (200, 32, 32, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.dtype == np.int64 and labels.shape == (200,)
    assert labels.min() >= 0 and labels.max() < record.num_classes

    # the whole train pool, in its order, moved by at most the L-inf budget (16/255) but moved
    pool = build_aux_set(record, "train", ratio=None)
    assert np.array_equal(labels, pool.labels.numpy())
    clean = pool.float_images().permute(0, 2, 3, 1).numpy()
    diff = np.abs(images - clean).max()
    assert 0 < diff <= 16 / 255 + 1e-6

    # read back through the package's <type>_vp source: the same values
    vp = build_aux_set(record, "train_vp", ratio=None)
    assert vp.source_names == ["train_vp"]
    assert torch.equal(vp.float_images(), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert np.array_equal(vp.labels.numpy(), labels)
