import math

import pandas as pd
import pytest
import torch

from backdoorbench_gic.models import build_model
from backdoorbench_gic.results import (MetricLog, defense_output_dir, load_defense_result, read_summary_last,
                                       write_defense_result, write_tidy_row)
from backdoorbench_gic.utils.io import atomic_path


def test_defense_result_files_in_backdoorbench_layout(tmp_path):
    net = build_model("preactresnet18", 10, width=8)
    out = defense_output_dir(tmp_path / "record" / "badnet", "ft", "cifar10_reserved")
    rows = [{"epoch": 0, "train_epoch_loss_avg_over_batch": 1.0, "test_acc": 0.5, "test_asr": 0.9, "test_ra": 0.1},
            {"epoch": 1, "train_epoch_loss_avg_over_batch": float("nan"), "test_acc": 0.6, "test_asr": 0.2,
             "test_ra": 0.7}]
    write_defense_result(out, csv_prefix="ft", model_name="preactresnet18", num_classes=10,
                         state_dict=net.state_dict(), history=rows, index=[5, 3, 9])
    assert out == tmp_path / "record" / "badnet" / "defense" / "ft" / "cifar10_reserved"
    saved = torch.load(out / "defense_result.pt", weights_only=True)
    assert list(saved) == ["model_name", "num_classes", "model"]
    build_model("preactresnet18", 10, width=8).load_state_dict(saved["model"], strict=True)
    assert (out / "log" / "index.txt").read_text() == "5\n3\n9\n"
    assert (out / "checkpoint").is_dir()
    summary = pd.read_csv(out / "ft_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    assert summary.loc["valid_max", "test_asr"] == 0.9  # max over epochs, not the result
    last = read_summary_last(out / "ft_df_summary.csv")
    assert last["test_asr"] == 0.2 and last["test_acc"] == 0.6
    df_text = (out / "ft_df.csv").read_text()
    assert "nan_value" in df_text
    assert (out / "acc_like_metric_plots.png").is_file()
    assert load_defense_result(out / "defense_result.pt")["num_classes"] == 10


def test_empty_defense_result_means_diverged(tmp_path):
    torch.save({}, tmp_path / "defense_result.pt")
    with pytest.raises(ValueError, match="diverged"):
        load_defense_result(tmp_path / "defense_result.pt")


def test_tidy_row_json_and_csv(tmp_path):
    write_tidy_row(tmp_path, {"defense": "ft", "der": 0.9, "asr_after": float("nan")})
    import json

    row = json.loads((tmp_path / "result.json").read_text())
    assert row == {"defense": "ft", "der": 0.9, "asr_after": None}
    assert pd.read_csv(tmp_path / "result.csv").loc[0, "der"] == 0.9


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_metric_log_summary_nan_flags():
    log = MetricLog([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
    s = log.summary()
    assert s.loc["last", "a"] == 3.0 and s.loc["valid_max", "b"] == 2.0
    assert bool(s.loc["exist_nan_value", "b"]) and not bool(s.loc["exist_nan_value", "a"])
    assert math.isnan(log.dataframe().loc[0, "b"])


def test_atomic_writes_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    """Results shared with a group (a benchmark folder, a BackdoorBench checkout) must not come out private."""
    import os

    from backdoorbench_gic.utils.io import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    p = atomic_write_text(tmp_path / "a.txt", "x")
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask) != 0o600
