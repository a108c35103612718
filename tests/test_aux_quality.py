"""The alignment diagnostic: exact moments, hand-checked formulas, monotonicity, the target-class flag, CLI."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from backdoorbench_gic.auxdata.quality import (VERDICTS, BNMoments, frechet_distance, measure_quality, plot_quality,
                                               purification_risk, quality_table, recalibrate_bn, risk_verdict,
                                               symmetric_gaussian_kl)
from backdoorbench_gic.data.imageset import ImageSet

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # the headline: the reference's own risk is measured on the same draw, so its row is exactly 'close' to it
    assert df.attrs["reference_risk"] == pytest.approx(df.loc[0, "risk"])
    assert df.loc[0, "verdict"] == "close" and df.loc[1, "risk"] > df.loc[0, "risk"]
    assert list(df.columns[:5]) == ["reserved_type", "n", "risk", "verdict", "bn_div"]


def test_cli_writes_table_and_plot(record, tmp_path, capsys):
    from backdoorbench_gic.cli import main

    csv, png = tmp_path / "q.csv", tmp_path / "q.png"
    code = main(["aux-quality", "--result_file", str(record.record_dir), "--reserved_type", "train", "reserved_noise",
                 "--option", "shift_base=train", "--n_per_class", "3", "--reference", "train",
                 "--csv", str(csv), "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    assert "reserved_noise" in out and "alignment" not in out  # the headline columns; --wide prints them all
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote")) <= 120
    assert f"wrote the table (every signal) to {csv}" in out and f"wrote the plot to {png}" in out
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


def test_risk_and_verdict_by_hand():
    assert purification_risk(0.01, 0.25) == pytest.approx(0.01)  # entropy factor 1 at H_a = 1/4
    assert purification_risk(0.01, 0.5) == pytest.approx(0.16)  # (0.5 / 0.25)^4 = 16
    assert purification_risk(0.003, 0.2) == pytest.approx(0.003 * 0.8 ** 4)
    assert math.isnan(purification_risk(float("nan"), 0.3))
    assert risk_verdict(0.0015, 0.24, 0.24) == "close"
    assert risk_verdict(0.002, 0.24, 0.24) == "shifted"  # the threshold belongs to shifted
    assert risk_verdict(0.07, 0.015, 0.26) == "fitted"  # confident only with the victim's own statistics
    assert risk_verdict(0.07, 0.43, 0.30) == "shifted"
    assert risk_verdict(float("nan"), 0.2, float("nan")) == "unknown"
    # against a reference set's risk: close up to twice it, whatever the absolute scale
    assert risk_verdict(0.0019, 0.17, 0.17, reference_risk=0.0005) == "shifted"
    assert risk_verdict(0.0026, 0.24, 0.24, reference_risk=0.0013) == "close"
    assert risk_verdict(0.07, 0.015, 0.26, reference_risk=0.05) == "fitted"
    assert set(VERDICTS) == {"close", "shifted", "fitted", "unknown"}


class _ScaleNet(torch.nn.Module):
    """1x1 convolution without bias -> BN -> mean pool -> linear: BN in training statistics absorbs a global scale."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(3, eps=1e-10)  # eps would break the exact scale invariance
        self.fc = torch.nn.Linear(3, 4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 1, 1, 1, generator=g))
            self.fc.weight.copy_(torch.randn(4, 3, generator=g) * 3)
            self.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.3]))
            self.bn.running_var.copy_(torch.tensor([0.05, 0.02, 0.08]))
        self.eval()

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_adapted_entropy_sees_through_a_global_scale_and_risk_ranks_it():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 4, 4, generator=g) * 0.5
    labels = torch.arange(64) % 4
    base = ImageSet(x, labels, name="base")
    scaled = ImageSet(x * 2.0, labels, name="scaled")  # a contrast-like shift
    model = _ScaleNet()
    a = measure_quality(model, base, 4, batch_size=64)
    b = measure_quality(model, scaled, 4, batch_size=64)
    # eval mode: the doubled inputs change the BN statistics and the predictions ...
    assert b.bn_div > a.bn_div and b.entropy != pytest.approx(a.entropy, abs=1e-3)
    # ... while with statistics re-estimated on each set (one batch: exact) they normalise to the same features
    assert b.entropy_adapted == pytest.approx(a.entropy_adapted, abs=1e-6)
    # the headline is the formula of its two inputs, the verdict follows the thresholds
    for r in (a, b):
        assert r.risk == pytest.approx(r.bn_div * (r.entropy_adapted / 0.25) ** 4)
        assert r.verdict == risk_verdict(r.risk, r.entropy, r.entropy_adapted)
    assert b.risk > a.risk
    # adapted entropy on the very statistics the victim holds equals the eval-mode entropy
    own = recalibrate_bn(_ScaleNet(), base)
    same = measure_quality(own, base, 4, batch_size=64)
    assert same.bn_div < 1e-9 and same.entropy_adapted == pytest.approx(same.entropy, abs=1e-9)
    # no BatchNorm: no risk, verdict unknown
    rep = measure_quality(_AlwaysThree(), ImageSet(torch.zeros(10, 1, 4, 4), torch.arange(10)), 10)
    assert math.isnan(rep.risk) and rep.verdict == "unknown" and math.isnan(rep.entropy_adapted)


def test_report_text_ranks_says_directions_verdicts_and_warns_of_the_target():
    from backdoorbench_gic.commands.aux_quality import report_text

    df = pd.DataFrame({"reserved_type": ["reserved_noise", "reserved", "synthetic:inversion"], "n": [200] * 3,
                       "risk": [0.07, 0.0016, 0.072], "verdict": ["shifted", "close", "fitted"],
                       "bn_div": [0.035, 0.002, 0.06], "entropy": [0.43, 0.24, 0.015], "hist_tvd": [0.45, 0.05, 0.0],
                       "top_class": [0, 3, 0], "top_share": [0.545, 0.115, 0.1], "flagged": ["0", "", ""]})
    text = report_text(df)
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["reserved", "reserved_noise", "synthetic:inversion"]  # by risk
    assert "risk: lower is better" in text and "hist_tvd: lower is better" in text
    assert "verdicts (close: risk below 0.002; with --reference reserved" in text
    df.attrs.update(reference="reserved", reference_risk=0.0016)
    assert "verdicts (close: risk at most 2 x the reference reserved's 0.0016):" in report_text(df)
    assert "bn_div: lower is better" in text and "entropy: closer" not in text  # entropy: --wide only
    assert "entropy: closer to the reserved/train row" in report_text(df, wide=True)
    assert max(map(len, text.splitlines())) <= 120  # the table and the wrapped prose
    flat = " ".join(text.split())
    assert f"reserved: close - {VERDICTS['close']}" in flat
    assert f"synthetic:inversion: fitted - {VERDICTS['fitted']}" in flat
    assert "warning: reserved_noise: class(es) 0" in flat and "target class" in flat
    assert "warning: reserved:" not in flat


def test_aux_evidence_joins_any_efficacy_csv(tmp_path):
    """benchmarks/aux_evidence.py on hand-made CSVs: rho by hand, a repeated block counted once, a missing type named."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "aux_evidence.py"
    types = ["reserved", "a", "b", "c"]
    pd.DataFrame({"reserved_type": types, "risk": [0.001, 0.01, 0.02, 0.03], "verdict": ["close"] + ["shifted"] * 3,
                  "bn_div": [0.04, 0.03, 0.02, 0.01], "entropy": [0.2] * 4, "hist_tvd": [0.0] * 4}
                 ).to_csv(tmp_path / "aux_quality_v.csv", index=False)

    def block(name, acc, extra=()):
        rows = [{"attack": "v", "base_defense": "ft", "aux_type": t, "aux_size_label": "n20", "acc_after_nogic": a,
                 "asr_after_nogic": 0.1, "der_nogic": 0.8, "acc_loss": acc[0] - a} for t, a in zip(types, acc)]
        rows += [{"attack": "v", "base_defense": "ft", "aux_type": t, "aux_size_label": "n20", "acc_after_nogic": 0.5,
                  "asr_after_nogic": 0.1, "der_nogic": 0.8, "acc_loss": acc[0] - 0.5} for t in extra]
        path = tmp_path / f"efficacy_{name}.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        return str(path)

    d = block("design", [0.80, 0.79, 0.75, 0.70])  # loss 0, 1, 5, 10 points: risk ranks it exactly
    v = block("new", [0.80, 0.81, 0.82, 0.83], extra=["reserved_tv:X"])  # reversed; one type not measured yet
    dup = block("design-budget", [0.80, 0.79, 0.75, 0.70])
    out = tmp_path / "ev.md"
    r = subprocess.run([sys.executable, str(script), "--efficacy", d, v, dup, "--quality_dir", str(tmp_path),
                        "--design", "design", "--out", str(out)], capture_output=True, text=True, check=True)
    text = out.read_text()
    assert "| design | v | ft | n20 | 4 | design | +1.00 | -1.00 |" in text  # risk +1, bn_div the other way
    assert "| new | v | ft | n20 | 4 | validation | -1.00 | +1.00 |" in text
    assert "in 1 of 2 groups (validation: 0 of 1)" in text and "held-out types (in no design group): none" in text
    assert "`design-budget` v ft n20: the same uncalibrated cells as `design`, counted once" in text
    assert "lacks reserved_tv:X" in r.stderr and "--append --types 'reserved_tv:X'" in r.stderr


def test_one_verdict_per_set_in_the_log_the_table_and_the_plot(record, tmp_path, caplog):
    """Issue 27: the per-set log line judged against the absolute bound while the table judged against
    --reference; now the verdict is decided once and the plot labels each bar with it."""
    import logging
    import re

    import matplotlib

    with caplog.at_level(logging.INFO, logger="backdoorbench_gic.auxdata.quality"):
        df, reports = quality_table(record, ["train", "reserved_noise"], reference="train", ratio=None, n_per_class=3,
                                    options={"shift_base": "train"})
    # this fixture's risks are far above the absolute bound: judged without the reference they would be 'shifted'
    assert any(risk_verdict(r.risk, r.entropy, r.entropy_adapted) != r.verdict for r in reports)
    logged = dict(m.groups() for r in caplog.records
                  if (m := re.match(r"(\S+): n \d+, risk \S+, verdict (\w+)", r.getMessage())))
    assert logged == dict(zip(df["reserved_type"], df["verdict"])) == {r.name: r.verdict for r in reports}
    svg = tmp_path / "q.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep the labels as text
        plot_quality(df, svg)
    text = svg.read_text()
    for _, row in df.iterrows():
        assert f"{row['risk']:.2g} {row['verdict']}" in text
    assert "verdict close: risk at most 2 x the reference train" in text
