from dataclasses import dataclass

import pytest

from backdoorbench_gic.config import ConfigError, RunConfig, build_config, coerce, load_config


@dataclass
class DemoConfig(RunConfig):
    alpha: float = 0.2


def _configs(tmp_path, packaged: str | None = None, cfg_name: str = "demo"):
    root = tmp_path / "defense_configs"
    (root / cfg_name).mkdir(parents=True)
    if packaged is not None:
        (root / cfg_name / "cifar10.yaml").write_text(packaged)
    return root


def test_precedence_defaults_packaged_yaml_cli(tmp_path):
    root = _configs(tmp_path, "epochs: 7\nlr: 0.05\nalpha: 0.3\nbatch_size: 64\n")
    user = tmp_path / "user.yaml"
    user.write_text("lr: 0.001\nalpha: 0.4\n")
    cfg = load_config(DemoConfig, "demo", "cifar10", yaml_path=user, cli={"alpha": 0.5, "epochs": None},
                      configs_dir=root)
    assert cfg.wd == 5e-4  # built-in default
    assert cfg.epochs == 7 and cfg.batch_size == 64  # packaged yaml (cli None does not override)
    assert cfg.lr == 0.001  # --yaml_path beats the packaged yaml
    assert cfg.alpha == 0.5  # CLI beats everything
    assert cfg.dataset == "cifar10"


def test_split_dataset_uses_base_yaml_and_config_yaml_fallback(tmp_path):
    root = _configs(tmp_path, "epochs: 3\n")
    assert load_config(DemoConfig, "demo", "cifar10_split_5_seed_0", configs_dir=root).epochs == 3
    (root / "demo" / "config.yaml").write_text("epochs: 9\n")
    assert load_config(DemoConfig, "demo", "gtsrb", configs_dir=root).epochs == 9


def test_unknown_key_names_key_and_file(tmp_path):
    root = _configs(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(DemoConfig, "demo", "cifar10", yaml_path=bad, configs_dir=root)
    msg = str(exc.value)
    assert "'learning_rate'" in msg and str(bad) in msg


def test_wrong_type_names_key_and_source(tmp_path):
    root = _configs(tmp_path, "epochs: many\n")
    with pytest.raises(ConfigError) as exc:
        load_config(DemoConfig, "demo", "cifar10", configs_dir=root)
    msg = str(exc.value)
    assert "'epochs'" in msg and "cifar10.yaml" in msg and "expected an int" in msg
    with pytest.raises(ConfigError, match="key 'amp' in the command line"):
        load_config(DemoConfig, "demo", None, cli={"amp": "maybe"}, configs_dir=root)


def test_range_checks_fail_before_work(tmp_path):
    root = _configs(tmp_path)
    with pytest.raises(ConfigError, match="'epochs'.*>= 0.*-1"):
        load_config(DemoConfig, "demo", "cifar10", cli={"epochs": -1}, configs_dir=root)
    with pytest.raises(ConfigError, match="'ratio'.*<= 1"):
        load_config(DemoConfig, "demo", "cifar10", cli={"ratio": 1.5}, configs_dir=root)


def test_yaml_scientific_notation_and_bool_strings_are_coerced(tmp_path):
    # PyYAML reads 1e-4 as a string; BackdoorBench's yamls are full of such values
    root = _configs(tmp_path, "lr: 1e-4\namp: 'false'\nadam_betas: [0.5, 0.9]\n")
    cfg = load_config(DemoConfig, "demo", "cifar10", configs_dir=root)
    assert cfg.lr == pytest.approx(1e-4) and cfg.amp is False and cfg.adam_betas == [0.5, 0.9]


def test_coerce_rules():
    assert coerce("3", int) == 3 and coerce(3.0, int) == 3
    with pytest.raises(TypeError):
        coerce(3.5, int)
    with pytest.raises(TypeError):
        coerce(True, float)
    assert coerce(None, int | None) is None
    assert coerce("0.1,0.2", list[float]) == [0.1, 0.2]


def test_build_config_reports_missing_required_keys():
    @dataclass
    class Needs:
        must: int

    with pytest.raises(ConfigError, match="needs the key\\(s\\) must"):
        build_config(Needs, [({}, "nothing")])


def test_backdoorbench_keys_are_accepted(tmp_path):
    text = ("device: cuda\namp: true\npin_memory: true\nnon_blocking: true\nprefetch: false\nnum_workers: 4\n"
            "frequency_save: 0\ndataset_path: ./data\nmodel: preactresnet18\nbatch_size: 256\nlr: 0.01\n"
            "lr_scheduler: CosineAnnealingLR\nclient_optimizer: sgd\nsgd_momentum: 0.9\nwd: 0.0005\nepochs: 100\n"
            "random_seed: 0\nratio: 0.05\nindex: null\nreserved_type: reserved_noise\n")
    root = _configs(tmp_path, text)
    cfg = load_config(RunConfig, "demo", "cifar10", configs_dir=root)
    assert cfg.reserved_type == "reserved_noise" and cfg.epochs == 100


def test_a_run_config_checks_itself_when_made_and_build_config_checks_once(monkeypatch):
    with pytest.raises(ConfigError, match="'lr'"):
        DemoConfig(lr=-1.0)  # made by hand: still checked
    calls = []
    monkeypatch.setattr(DemoConfig, "validate", lambda self: calls.append(1))
    build_config(DemoConfig, [({"alpha": 0.3}, "test")])
    assert len(calls) == 1


def test_result_neutral_and_per_run_keys_come_from_field_metadata():
    from backdoorbench_gic.config import identity, marked_keys

    assert marked_keys(RunConfig, "identity") == {
        "device", "num_workers", "pin_memory", "non_blocking", "prefetch", "frequency_save", "log", "yaml_path",
        "result_file", "checkpoint_load", "checkpoint_save", "dataset_path"}  # where or how fast, not what
    assert marked_keys(RunConfig, "per_run") == {"random_seed", "ratio", "index", "reserved_type"}
    cfg = DemoConfig(alpha=0.3, device="cpu")
    kept = identity(cfg)
    assert "device" not in kept and kept["alpha"] == 0.3 and kept["random_seed"] == 0 and kept["amp"] is True
    assert identity(cfg, RunConfig).keys() == kept.keys() - {"alpha"}
