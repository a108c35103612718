"""The sampling rule, index files, type names and the build_aux_set contract (hand-checked counts)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoorbench_gic.auxdata import AuxDataError, build_aux_set, parse_reserved_type
from backdoorbench_gic.auxdata.sampling import per_class_counts, read_index_file, sample_positions, write_index_file
from backdoorbench_gic.registry import UnknownNameError

# a pool with 10 images of class 0, 20 of class 1, 5 of class 2 (interleaved)
LABELS = np.array([0] * 10 + [1] * 20 + [2] * 5)[np.random.RandomState(7).permutation(35)]


def counts(positions, labels=LABELS, k=3):
    return np.bincount(labels[positions], minlength=k).tolist()


def test_ratio_rule_counts_by_hand():
    # ratio_c = 0.1 * 140 / 35 = 0.4 -> floor(0.4 * [10, 20, 5]) = [4, 8, 2]
    avail, req = per_class_counts(LABELS, 3, ratio=0.1, train_size=140)
    assert avail.tolist() == [10, 20, 5] and req.tolist() == [4, 8, 2]
    pos = sample_positions(LABELS, 3, ratio=0.1, train_size=140, seed=0)
    assert counts(pos) == [4, 8, 2]
    assert len(np.unique(pos)) == 14 and np.all(np.diff(pos) > 0)  # without replacement, sorted
    assert np.array_equal(pos, sample_positions(LABELS, 3, ratio=0.1, train_size=140, seed=0))
    assert not np.array_equal(pos, sample_positions(LABELS, 3, ratio=0.1, train_size=140, seed=1))


def test_ratio_rule_floor_tolerates_rounding():
    labels = np.zeros(100, dtype=np.int64)
    assert 0.29 * 100 < 29  # 28.999999999999996 in floating point
    assert per_class_counts(labels, 1, ratio=0.29, train_size=100)[1].tolist() == [29]


def test_n_per_class_all_and_eligible():
    pos = sample_positions(LABELS, 3, n_per_class=3, seed=0)
    assert counts(pos) == [3, 3, 3]
    assert counts(sample_positions(LABELS, 3, seed=0)) == [10, 20, 5]  # no ratio, no n: the whole pool
    eligible = np.ones(35, dtype=bool)
    eligible[np.flatnonzero(LABELS == 0)[:8]] = False  # two class-0 images left
    pos = sample_positions(LABELS, 3, n_per_class=2, seed=0, eligible=eligible)
    assert counts(pos) == [2, 2, 2] and eligible[pos].all()


def test_short_class_error_names_class_and_counts():
    with pytest.raises(AuxDataError, match=r"has 5 image\(s\) of class 2 but the sampling rule asks for 6"):
        sample_positions(LABELS, 3, n_per_class=6, seed=0, source="reserved_noise")
    with pytest.raises(AuxDataError, match="class 0.*asks for 20.*also short: classes 1, 2"):
        sample_positions(LABELS, 3, ratio=0.5, train_size=140)  # ratio_c = 2
    with pytest.raises(AuxDataError, match="selects no image"):
        sample_positions(LABELS, 3, ratio=0.01, train_size=35)
    with pytest.raises(AuxDataError, match="no image of class 3"):
        sample_positions(LABELS, 4, n_per_class=1, replacement=True)


def test_replacement_and_allow_short():
    pos = sample_positions(LABELS, 3, n_per_class=6, seed=0, replacement=True)
    assert counts(pos) == [6, 6, 6]
    class2 = pos[LABELS[pos] == 2]
    assert set(class2) == set(np.flatnonzero(LABELS == 2))  # all five, plus one repeat
    assert len(np.unique(pos[LABELS[pos] != 2])) == 12  # the other classes are still drawn without replacement
    assert counts(sample_positions(LABELS, 3, n_per_class=6, allow_short=True)) == [6, 6, 5]


def test_index_files_round_trip_and_errors(tmp_path):
    p = write_index_file(tmp_path / "log" / "index.txt", [3, 1, 4])
    assert p.read_text() == "3\n1\n4\n"
    assert read_index_file(p, 5).tolist() == [3, 1, 4]
    (tmp_path / "bad.txt").write_text("1\n\n# comment\n9\n")
    with pytest.raises(AuxDataError, match="index 9 is outside the pool of 5"):
        read_index_file(tmp_path / "bad.txt", 5)
    (tmp_path / "frac.txt").write_text("1.5\n")
    with pytest.raises(AuxDataError, match="not an integer"):
        read_index_file(tmp_path / "frac.txt", 5)
    with pytest.raises(FileNotFoundError):
        read_index_file(tmp_path / "missing.txt", 5)


@pytest.mark.parametrize("name,expected", [
    ("train", ("train", None)),
    ("reserved_noise", ("reserved_noise", None)),
    ("Reserved_Brightness", ("reserved_brightness", None)),
    ("external:digits", ("external", "digits")),
    ("synthetic:inversion", ("synthetic", "inversion")),
    ("reserved_vp", ("vp", "reserved")),
    ("reserved_noise_vp", ("vp", "reserved_noise")),
    ("reserved_imagenet", ("folder", "reserved_imagenet")),
    ("reserved_tv:RandomErasing(p=1.0)|GaussianBlur(3)", ("reserved_tv", "RandomErasing(p=1.0)|GaussianBlur(3)")),
    ("mix:train+reserved_noise@2", ("mix", "train+reserved_noise@2")),
])
def test_parse_reserved_type(name, expected):
    assert parse_reserved_type(name) == expected


def test_unknown_types_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="Known types:.*reserved_noise.*train"):
        parse_reserved_type("trian")
    with pytest.raises(UnknownNameError, match="unknown auxiliary type prefix 'extrnal'"):
        parse_reserved_type("extrnal:digits")
    with pytest.raises(AuxDataError, match="needs an argument"):
        parse_reserved_type("external")
    with pytest.raises(AuxDataError, match="takes no"):
        parse_reserved_type("train:x")


@pytest.fixture(scope="module")
def record(small_record):
    return small_record("cifar10")


def test_build_train_set_follows_the_rule(record):
    aux = build_aux_set(record, "train", ratio=0.2, seed=3)  # pool = train: ratio_c = 0.2 -> 2 of each 10
    assert len(aux) == 20 and aux.class_counts(10).tolist() == [2] * 10
    assert aux.is_uint8 and aux.name == "train" and aux.source_names == ["train"]
    assert int(aux.poison.sum()) == 0 and torch.equal(aux.labels, aux.original_labels)
    train = record.clean_train
    assert torch.equal(aux.images, train.images[aux.indices]) and torch.equal(aux.labels, train.labels[aux.indices])
    assert torch.equal(aux.indices, build_aux_set(record, "train", ratio=0.2, seed=3).indices)
    with pytest.raises(AuxDataError, match="selects no image"):
        build_aux_set(record, "train")  # default ratio 0.05 of 10 per class: floor(0.5) = 0


def test_build_from_index_file_keeps_order(record, tmp_path):
    idx = write_index_file(tmp_path / "index.txt", [7, 2, 99, 2])
    aux = build_aux_set(record, "train", index_file=idx)
    assert aux.indices.tolist() == [7, 2, 99, 2]
    assert torch.equal(aux.images, record.clean_train.images[[7, 2, 99, 2]])
    with pytest.raises(AuxDataError, match="either n_per_class or index_file"):
        build_aux_set(record, "train", n_per_class=1, index_file=idx)


def test_options_are_checked_and_poisoned_indices_can_be_excluded(record):
    with pytest.raises(AuxDataError, match="unknown option.*'include_poisoned'.*include_poisoned_indices"):
        build_aux_set(record, "train", n_per_class=1, options={"include_poisoned": False})
    poisoned = set(np.flatnonzero(record.bd_train_state.poison_indicator == 1).tolist())
    assert len(poisoned) == 10
    aux = build_aux_set(record, "train", ratio=None, options={"include_poisoned_indices": False})
    assert len(aux) == 90 and not poisoned & set(aux.indices.tolist())
    aux = build_aux_set(record, "train", ratio=None)
    assert len(aux) == 100


def test_short_tolerance_for_already_drawn_pools():
    # a pool of [4, 8, 2] (an earlier draw) with the rule asking for ratio 0.1 x |train| 150 = 15 images:
    # ratio_c = 15 / 14, floor(ratio_c x [4, 8, 2]) = [4, 8, 2] -> fine; with |train| 160: floor([4.57, 9.14, 2.29])
    labels = np.array([0] * 4 + [1] * 8 + [2] * 2)
    assert counts(sample_positions(labels, 3, ratio=0.1, train_size=150), labels) == [4, 8, 2]
    with pytest.raises(AuxDataError, match="class 1"):
        sample_positions(labels, 3, ratio=0.1, train_size=160)
    assert counts(sample_positions(labels, 3, ratio=0.1, train_size=160, short_tolerance=1), labels) == [4, 8, 2]
    with pytest.raises(AuxDataError, match="class 1"):  # two short is not rounding any more
        sample_positions(labels, 3, ratio=0.1, train_size=190, short_tolerance=1)
