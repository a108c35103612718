"""The alignment diagnostic: exact moments, hand-checked formulas, monotonicity, the target-class flag, CLI."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from backdoorbench_gic.auxdata.quality import (BNMoments, frechet_distance, measure_quality, quality_table,
                                           recalibrate_bn, symmetric_gaussian_kl)
from backdoorbench_gic.data.imageset import ImageSet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two intra-op threads on a busy 2-core machine spin-wait badly; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_symmetric_kl_by_hand():
    t = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    # N(1,1) vs N(0,1): both KLs are 1/2
    assert float(symmetric_gaussian_kl(t(1), t(1), t(0), t(1), eps=0)) == pytest.approx(0.5)
    # N(0,4) vs N(0,1): KL = (log(1/4) + 4 - 1)/2 and (log 4 + 1/4 - 1)/2, mean 0.5625
    expected = ((math.log(0.25) + 3) / 2 + (math.log(4) - 0.75) / 2) / 2
    assert expected == pytest.approx(0.5625)
    assert float(symmetric_gaussian_kl(t(0), t(4), t(0), t(1), eps=0)) == pytest.approx(expected)
    assert float(symmetric_gaussian_kl(t(0.3), t(2), t(0.3), t(2))) == 0


def test_bn_moments_are_exact_over_uneven_batches():
    bn = torch.nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(0.2)
    bn.running_var.fill_(0.5)
    model = torch.nn.Sequential(bn)
    data = ImageSet(torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1), [0, 0, 0])
    mom = BNMoments(model)
    with torch.no_grad():
        for batch in data.batches(2):  # batches [0, 0.5] and [1.0]: a per-batch average would differ
            model(batch.x)
    mom.remove()
    (name, d), = mom.divergences()
    # whole set: mean 0.5, unbiased variance 0.25
    v, s2 = 0.25 + bn.eps, 0.5 + bn.eps
    assert d == pytest.approx(0.25 * (v / s2 + s2 / v - 2 + 0.3 ** 2 * (1 / v + 1 / s2)))


def test_frechet_distance_by_hand():
    # 1-D: ||0 - 2||^2 + 1 + 4 - 2 sqrt(1 * 4) = 5
    assert frechet_distance(np.zeros(1), np.eye(1), np.full(1, 2.0), 4 * np.eye(1)) == pytest.approx(5.0)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(np.ones(2), cov, np.ones(2), cov) == pytest.approx(0.0, abs=1e-9)


class _AlwaysThree(torch.nn.Module):
    """Predicts class 3 with probability ~0.9 whatever the input (a backdoor's pull, in caricature)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = math.log(0.9 * 9 / 0.1)
        return logits


def test_histogram_flags_a_class_that_attracts_predictions():
    data = ImageSet(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 10, name="probe")
    rep = measure_quality(_AlwaysThree(), data, 10)
    assert rep.flagged == [3] and rep.top_class == 3 and rep.top_share == 1.0
    assert rep.top_attraction == pytest.approx(10.0)
    assert rep.hist_tvd == pytest.approx(0.9) and rep.accuracy == pytest.approx(0.1)
    assert rep.confidence == pytest.approx(0.9)
    p = np.array([0.9] + [0.1 / 9] * 9)
    h = float(-(p * np.log(p)).sum() / math.log(10))
    assert rep.entropy == pytest.approx(h)
    assert math.isnan(rep.bn_div)  # no BatchNorm layer: the factor is left out of the score
    assert rep.alignment == pytest.approx((1 - h) * 0.1)
    balanced = measure_quality(_AlwaysThree(), data.subset([3, 13]), 10)  # only class-3 samples: no flag
    assert balanced.flagged == [] and balanced.hist_tvd == 0


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    root = tmp_path_factory.mktemp("quality")
    return load_attack_record(make_bb_record(root, "badnet_q", "mnist", n_train=200, n_test=20, model_name="smallcnn",
                                             width=16, train_steps=20, trigger_size=8))


def test_own_training_data_scores_zero_and_noise_grows_monotonically(record):
    victim = recalibrate_bn(record.build_model(), record.clean_train)  # running stats = the training data's
    train = record.clean_train
    own = measure_quality(victim, train, 10, batch_size=64)
    assert own.bn_div < 1e-6 and own.bn_first < 1e-9
    x = train.float_images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    divs = [measure_quality(victim, ImageSet((x + s * noise).clamp(0, 1), train.labels), 10, batch_size=64).bn_div
            for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip([own.bn_div] + divs, divs)), divs
    assert divs[-1] > 100 * divs[0]


def test_fd_against_reference_and_the_table(record):
    victim = recalibrate_bn(record.build_model(), record.clean_train)
    df, reports = quality_table(record, ["train", "reserved_noise", "external:digits"], reference="train", ratio=None,
                                n_per_class=5, victim=victim, options={"shift_base": "train", "noise_std": 0.3})
    assert df["reserved_type"].tolist() == ["train", "reserved_noise", "external:digits"]
    assert {"bn_div", "entropy", "confidence", "hist_tvd", "flagged", "fd", "alignment"} <= set(df.columns)
    assert df.loc[0, "fd"] == pytest.approx(0.0, abs=1e-4)  # the reference against itself (same seed, same draw)
    assert df.loc[1, "bn_div"] > df.loc[0, "bn_div"] and df.loc[1, "fd"] > 0
    assert (df["alignment"].between(0, 1)).all() and (df["n"] == 50).all()
    assert df.loc[0, "alignment"] > df.loc[1, "alignment"]


def test_cli_writes_table_and_plot(record, tmp_path, capsys):
    from backdoorbench_gic.cli import main

    csv, png = tmp_path / "q.csv", tmp_path / "q.png"
    code = main(["aux-quality", "--result_file", str(record.record_dir), "--reserved_type", "train", "reserved_noise",
                 "--option", "shift_base=train", "--n_per_class", "3", "--reference", "train",
                 "--csv", str(csv), "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    assert "reserved_noise" in out and "alignment" in out
    df = pd.read_csv(csv)
    assert df["reserved_type"].tolist() == ["train", "reserved_noise"] and len(df.columns) >= 15
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["aux-quality", "--result_file", str(record.record_dir), "--reserved_type", "reserved"]) == 2
    assert "bbgic split" in capsys.readouterr().err
    # export in BackdoorBenchER's layout under the record's dataset folder
    assert main(["aux-export", "--result_file", str(record.record_dir), "--reserved_type", "external:digits",
                 "--n_per_class", "2"]) == 0
    folder = record.dataset_dir() / "external_digits"
    assert len(list(folder.rglob("*.png"))) == 20 and (folder / "meta.txt").is_file()
