"""Shared fixtures: generated datasets and BackdoorBench-format records in temporary folders."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("BBGIC_NO_PROGRESS", "1")
# GIC fits and inversions are cached by content: keep the tests' caches out of the user's home
os.environ.setdefault("BBGIC_CACHE_DIR", tempfile.mkdtemp(prefix="bbgic_test_cache_"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests: two threads on a busy 2-core machine spin-wait badly (tens of
    times slower); the previous count is restored afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from backdoorbench_gic.testing import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def bb_record(tmp_path_factory):
    """A BackdoorBench root with CIFAR-10 pickles and a BadNets record of a width-8 PreActResNet-18."""
    from backdoorbench_gic.testing import make_bb_record

    root = tmp_path_factory.mktemp("bbroot")
    record_dir = make_bb_record(root, "badnet_fixture", "cifar10", n_train=100, n_test=50, train_steps=0)
    return root, record_dir


@pytest.fixture(scope="session")
def small_record(tmp_path_factory):
    """``small_record("mnist")``: a loaded record of an untrained width-8 smallcnn with 100 training and 20 test
    images of that dataset, made once per dataset for the whole session."""
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    made = {}

    def get(dataset: str):
        if dataset not in made:
            root = tmp_path_factory.mktemp(f"small_{dataset}")
            made[dataset] = load_attack_record(make_bb_record(root, f"badnet_{dataset}", dataset, n_train=100,
                                                              n_test=20, model_name="smallcnn", width=8,
                                                              train_steps=0))
        return made[dataset]

    return get


@pytest.fixture()
def fresh_bb_record(tmp_path):
    """A record that a test may modify."""
    from backdoorbench_gic.testing import make_bb_record

    record_dir = make_bb_record(tmp_path, "badnet_fixture", "cifar10", n_train=60, n_test=30)
    return tmp_path, record_dir


@pytest.fixture(scope="session")
def backdoored_record(tmp_path_factory):
    """A loaded record of a smallcnn (width 16) on the CIFAR-10 fixture with a working 8x8-patch backdoor (target 0):
    300 training images (30 poisoned), 100 test images. Shared by the probe and PAM tests; treat it as read-only
    (write defense outputs elsewhere with output_dir)."""
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record, torch_threads

    root = tmp_path_factory.mktemp("backdoored")
    with torch_threads(1):
        make_bb_record(root, "r", n_train=300, n_test=100, train_steps=80, model_name="smallcnn", width=16,
                       trigger_size=8)
    return load_attack_record(root / "record" / "r")
