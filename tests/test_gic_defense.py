"""The gic defense: nested base config, equal auxiliary draws, aliases, calibration handed to the base defense,
caching, per-source g, placements."""
import pytest
import torch

from backdoorbench_gic.config import ConfigError
from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.defenses.base import Defense, PurifyResult
from backdoorbench_gic.config import RunConfig, config_keys
from backdoorbench_gic.gic import calibration as gic_calibration
from backdoorbench_gic.gic.defense import GIC_KEYS, PLACEMENTS, GICDefense, restore_bn_statistics, split_keys
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.registry import DEFENSES
from backdoorbench_gic.testing import make_bb_record


@pytest.fixture(scope="module")
def victim_record(tmp_path_factory):
    root = tmp_path_factory.mktemp("gicdef")
    d = make_bb_record(root, "r", n_train=200, n_test=60, train_steps=40, model_name="smallcnn", width=8, trigger_size=8)
    return load_attack_record(d)


class Spy(Defense):
    """Records what it was given; returns the model unchanged."""

    seen: list = []

    def purify(self, model, aux, *, device, train_augment=None, monitor=None, progress=None):
        Spy.seen.append(aux)
        return PurifyResult(model, [{"epoch": 0}])


@pytest.fixture()
def spy_registered():
    DEFENSES.add("spy", Spy, force=True)
    Spy.seen = []
    yield
    DEFENSES._builders.pop("spy", None)


def test_flat_keys_are_placed_and_ambiguous_or_unknown_ones_refused():
    sau_keys = set(config_keys(DEFENSES.get("sau").config_class))
    gic, base = split_keys({"delta": 0.1, "base": "sau", "n_rounds": 3, "random_seed": 4, "lr": 0.5,
                            "base.adv_steps": 2, "placement": "bn-after"}, sau_keys, "test")
    assert gic == {"delta": 0.1, "base": "sau", "placement": "bn-after"}
    assert base == {"n_rounds": 3, "random_seed": 4, "lr": 0.5, "adv_steps": 2}  # run-level keys go to the base
    with pytest.raises(ConfigError, match="'delta'.*ambiguous"):
        split_keys({"delta": 0.1}, sau_keys | {"delta"}, "test")  # a base that also takes 'delta'
    with pytest.raises(ConfigError, match="'n_roundz'"):
        split_keys({"n_roundz": 1}, sau_keys, "test")


def test_nested_base_config(tmp_path):
    y = tmp_path / "g.yaml"
    y.write_text("base: {name: sau, n_rounds: 3, adv_steps: 2}\ndelta: 0.03\nplacement: bn-after\n")
    d = GICDefense.from_sources("fashion-mnist", str(y), {"device": "cpu"})
    assert d.base.name == "sau" and d.base.config.n_rounds == 3 and d.base.config.adv_steps == 2
    assert d.config.delta == pytest.approx(0.03) and d.config.placement == "bn-after" and d.config.base == "sau"
    with pytest.raises(ConfigError, match="'placement'"):
        GICDefense.from_sources("fashion-mnist", None, {"placement": "sideways"})


GIC_DATASETS = ("config", "cifar10", "cifar100", "gtsrb", "tiny", "fashion-mnist", "mnist", "digits")
DRAW_KEYS = ("ratio", "reserved_type", "random_seed", "index", "batch_size", "device")


@pytest.mark.parametrize("stem", GIC_DATASETS)
@pytest.mark.parametrize("base", ["ft", "fst", "sau"])
def test_gic_draws_exactly_what_its_base_draws(stem, base, victim_record):
    """Issue 18: gic --base ft must purify on the draw ft gets (ratio, type, seed, index, batch) on every yaml."""
    from backdoorbench_gic.auxdata import build_aux_set

    dataset = None if stem == "config" else stem
    plain = DEFENSES.get(base).from_sources(dataset, None, {"reserved_type": "reserved_noise"}, name=base)
    wrapped = GICDefense.from_sources(dataset, None, {"base": base, "reserved_type": "reserved_noise"})
    for k in config_keys(RunConfig):
        assert getattr(wrapped.run_config, k) == getattr(plain.run_config, k) == getattr(wrapped.base.config, k), k
    assert wrapped.run_config is wrapped.base.config is wrapped.config.base_config  # one config, nested, not copied
    # the fixture has 200 training images, so each side's ratio is scaled alike to draw a few per class
    a = build_aux_set(victim_record, "train", ratio=min(1.0, 40 * plain.run_config.ratio),
                      seed=plain.run_config.random_seed)
    b = build_aux_set(victim_record, "train", ratio=min(1.0, 40 * wrapped.run_config.ratio),
                      seed=wrapped.run_config.random_seed)
    assert len(a) == len(b) and torch.equal(a.indices, b.indices)


def test_from_sources_builds_the_base_with_its_own_yaml_and_overrides():
    d = GICDefense.from_sources("fashion-mnist", None, {"base": "sau", "adv_steps": 2, "delta": 8 / 255,
                                                        "device": "cpu"})
    assert d.base.name == "sau" and d.base.config.adv_steps == 2 and d.config.delta == pytest.approx(8 / 255)
    assert d.base.config.n_rounds == 10  # from defense_configs/sau/fashion-mnist.yaml (the built-in default is 100)
    assert d.name == "gic-sau" and d.prefix == "gic-sau"


def test_one_config_path_and_its_flat_and_nested_views():
    """from_sources and keyword construction take the one resolve_config path; the nested config comes back from
    its yaml-style layer, and its flat view is what the run-level, GIC and placement keys say."""
    d = GICDefense.from_sources("fashion-mnist", None, {"base": "sau", "adv_steps": 2, "delta": 8 / 255})
    again = GICDefense(**d.config.as_layer())
    assert again.config == d.config and again.base.config == d.base.config
    flat = d.config.flat()
    assert flat["base"] == "sau" and flat["delta"] == pytest.approx(8 / 255) and flat["ratio"] == d.run_config.ratio
    assert set(flat) == set(config_keys(RunConfig)) | GIC_KEYS and "adv_steps" not in flat
    with pytest.raises(ConfigError, match="'base_config'"):
        GICDefense(base_config={"epochs": 1})  # the nested config is built, never given as a key


def test_unknown_key_is_still_an_error_naming_it():
    with pytest.raises(ConfigError, match="'n_roundz'"):
        GICDefense.from_sources("fashion-mnist", None, {"base": "sau", "n_roundz": 2})
    with pytest.raises(ConfigError, match="'base'"):
        GICDefense.from_sources("fashion-mnist", None, {"base": "gic"})


def test_aliases_exist_for_every_builtin_defense():
    bases = [name for name in DEFENSES.names() if not issubclass(DEFENSES.get(name), GICDefense)]
    assert len(bases) >= 10 and "gic" not in bases
    for base in bases:
        cls = DEFENSES.get(f"gic-{base}")
        assert issubclass(cls, GICDefense)
        assert cls.from_sources("fashion-mnist", None, {"device": "cpu"}).base.name == base


def test_base_gets_calibrated_data_within_budget(victim_record, spy_registered, tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    victim = victim_record.build_model()
    aux = victim_record.clean_train.subset(torch.arange(60))
    shifted = aux.with_images((aux.float_images() * 0.5).clamp(0, 1))
    d = GICDefense.from_sources(None, None, {"base": "spy", "gic_steps": 20, "gic_batch_size": 30, "delta": 16 / 255,
                                             "device": "cpu"})
    result = d.purify(victim, shifted, device=torch.device("cpu"))
    given = Spy.seen[-1]
    assert isinstance(given, ImageSet) and not given.is_uint8
    assert torch.equal(given.labels, shifted.labels) and torch.equal(given.indices, shifted.indices)
    diff = (given.images - shifted.float_images()).abs().amax()
    assert 0 < diff <= 16 / 255 + 1e-6
    ex = result.extras
    assert ex["bn_div_after"] < ex["bn_div_before"] and ex["gic_cached"] == 0.0
    assert {"drift_class", "drift_share", "gic_seconds", "base_seconds"} <= set(ex)


def test_fitted_g_is_reused_across_base_defenses(victim_record, spy_registered, tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    gic_calibration._MEMORY_CACHE.clear()
    victim = victim_record.build_model()
    aux = victim_record.clean_train.subset(torch.arange(40))
    cli = {"gic_steps": 5, "gic_batch_size": 20, "device": "cpu"}
    first = GICDefense.from_sources(None, None, {**cli, "base": "spy"}).calibrate(victim, aux, device=torch.device("cpu"))
    assert first[1]["gic_cached"] == 0.0 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    second = GICDefense.from_sources(None, None, {**cli, "base": "ft"}).calibrate(victim, aux, device=torch.device("cpu"))
    assert second[1]["gic_cached"] == 1.0
    assert torch.equal(first[0].images, second[0].images)
    gic_calibration._MEMORY_CACHE.clear()  # from disk now
    third = GICDefense.from_sources(None, None, {**cli, "base": "ft"}).calibrate(victim, aux, device=torch.device("cpu"))
    assert third[1]["gic_cached"] == 1.0 and torch.allclose(third[0].images, first[0].images)
    summary = ("bn_div_before", "bn_div_after", "drift_class", "drift_share", "drift_flag")
    assert {k: third[1][k] for k in summary} == {k: first[1][k] for k in summary}  # the summary is cached too
    assert len(list((tmp_path / "cache").glob("summary-*.json"))) == 1


def test_per_source_fits_one_g_per_provenance(victim_record, tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    victim = victim_record.build_model()
    a = victim_record.clean_train.subset(torch.arange(30))
    a = ImageSet(a.images, a.labels, source_names=["reserved"])
    b = ImageSet((a.float_images() * 0.4).clamp(0, 1), a.labels, source_names=["dark"])
    mix = ImageSet.concat([a, b])
    cli = {"gic_steps": 10, "gic_batch_size": 30, "device": "cpu", "base": "ft", "per_source": True, "gic_cache": False}
    cal, info = GICDefense.from_sources(None, None, cli).calibrate(victim, mix, device=torch.device("cpu"))
    assert "gic_delta[reserved]" in info and "gic_delta[dark]" in info
    assert cal.source_names == ["reserved", "dark"] and torch.equal(cal.sources, mix.sources)
    one = GICDefense.from_sources(None, None, {**cli, "per_source": False}).calibrate(victim, mix, device=torch.device("cpu"))
    assert not torch.allclose(one[0].images, cal.images)


@pytest.mark.parametrize("stem", GIC_DATASETS)
def test_packaged_gic_yaml_is_used_and_leaves_the_base_defense_alone(stem, tmp_path, monkeypatch):
    import shutil
    from dataclasses import MISSING, fields

    from backdoorbench_gic import config as config_mod
    from backdoorbench_gic.config import default_yaml_for, read_yaml
    from backdoorbench_gic.gic.defense import GIC_KEYS, GICDefenseConfig
    from backdoorbench_gic.resources import defense_configs_dir, patches_dir

    dataset = None if stem == "config" else stem
    packaged = defense_configs_dir() / "gic" / f"{stem}.yaml"
    assert default_yaml_for("gic", dataset) == packaged
    values = read_yaml(packaged)
    assert set(values) <= GIC_KEYS, "a common key in the gic yaml would override the base defense's own yaml"
    assert "base" not in values, "a packaged base would override the gic-<base> aliases"
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(GICDefenseConfig) if f.name in values}
    assert values == defaults  # the packaged values are GICConfig's defaults (universal L-inf prompt, BN, 16/255)
    assert values["delta"] == 16 / 255 and values["gic_lr"] == 0.05 and values["gic_steps"] == 100
    d = GICDefense.from_sources(dataset)
    assert all(getattr(d.config, k) == v for k, v in values.items())
    # gic with base ft trains exactly as ft does; an alias still picks its base
    assert d.base.name == "ft" and d.base.config == DEFENSES.get("ft").from_sources(dataset).config
    assert DEFENSES.get("gic-sau").from_sources(dataset).base.config == DEFENSES.get("sau").from_sources(dataset).config
    # BackdoorBench's copies (bbgic patch) carry the same GIC values
    bb_yaml = patches_dir() / "backdoorbench" / "config" / "defense" / "gic" / f"{stem}.yaml"
    if bb_yaml.is_file():
        theirs = read_yaml(bb_yaml)
        assert {k: theirs[k] for k in values if k in theirs} == {k: values[k] for k in values if k in theirs}

    # and the lookup really reads that file: a changed copy changes the config
    copy = tmp_path / "defense_configs"
    shutil.copytree(defense_configs_dir(), copy)
    (copy / "gic" / f"{stem}.yaml").write_text(packaged.read_text().replace("gic_steps: 100", "gic_steps: 7"))
    monkeypatch.setattr(config_mod, "defense_configs_dir", lambda: copy)
    assert GICDefense.from_sources(dataset).config.gic_steps == 7


class Shift(Defense):
    """A stand-in purification that trains nothing but leaves shifted BatchNorm statistics behind, as fine-tuning
    on shifted data does: it re-estimates the model's statistics on what it is given."""

    def purify(self, model, aux, *, device, train_augment=None, monitor=None, progress=None):
        from backdoorbench_gic.bnstats import recalibrate_bn

        net = self.copy_model(model, device)
        recalibrate_bn(net, aux, device=device)
        return PurifyResult(net.eval(), [{"epoch": 0}])


def _bn_means(model):
    from backdoorbench_gic.bnstats import batchnorm_layers

    return [m.running_mean.clone() for _, m in batchnorm_layers(model)]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placements(placement, victim_record, tmp_path, monkeypatch):
    from backdoorbench_gic.bnstats import recalibrate_bn

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    DEFENSES.add("shift", Shift, force=True)
    try:
        victim = victim_record.build_model()
        aux = victim_record.clean_train.subset(torch.arange(60))
        shifted = aux.with_images((aux.float_images() * 0.5).clamp(0, 1))
        d = GICDefense.from_sources(None, None, {"base": "shift", "placement": placement, "gic_steps": 10,
                                                 "gic_batch_size": 30, "device": "cpu", "bn_batch_size": 1000})
        before = [m.clone() for m in _bn_means(victim)]
        out = d.purify(victim, shifted, device=torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(before, _bn_means(victim))), "the victim was modified"
        got = _bn_means(out.model)
        if placement == "bn-reset":
            assert all(torch.equal(a, b) for a, b in zip(got, before))
            assert "gic_seconds" not in out.extras  # no calibration fitted
        elif placement == "bn-transfer":  # Shift re-estimates on the shifted set, like the victim's probe: so the
            # purified model's statistics on it equal the victim's, and the transfer lands on the victim's own
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, before))
            assert "gic_seconds" not in out.extras
        elif placement == "bn-refresh":  # the shift's own statistics, re-estimated on the raw set
            ref = _bn_means(recalibrate_bn(Shift().copy_model(victim, torch.device("cpu")), shifted))
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, ref))
        else:  # the statistics of g(shifted), whichever data the base saw
            g_aux = d.gic.transform(shifted)
            ref = _bn_means(recalibrate_bn(Shift().copy_model(victim, torch.device("cpu")), g_aux))
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))
            assert out.extras["bn_div_after"] < out.extras["bn_div_before"]
    finally:
        DEFENSES._builders.pop("shift", None)


def test_restore_bn_statistics_refuses_other_architectures(victim_record):
    from backdoorbench_gic.models import build_model

    other = build_model("preactresnet18", num_classes=10, width=4)
    with pytest.raises(ValueError, match="differ"):
        restore_bn_statistics(victim_record.build_model(), other)


def test_transfer_bn_statistics_by_hand():
    """One BN layer over 1 channel: victim running (mu 2, var 4); the victim on aux sees (mean 3, var 1), the
    purified model on aux (mean 10, var 9): z = (2 - 3) / 1 = -1 -> mean 10 - 1 * 3 = 7; var 9 * 4 / 1 = 36."""
    from backdoorbench_gic.gic.defense import transfer_bn_statistics

    class Net(torch.nn.Module):
        def __init__(self, scale, shift):
            super().__init__()
            self.scale, self.shift = scale, shift
            self.bn = torch.nn.BatchNorm2d(1, eps=1e-12)  # eps out of the hand computation

        def forward(self, x):
            return self.bn(x * self.scale + self.shift)

    aux = ImageSet(torch.tensor([0.25, 0.75]).view(2, 1, 1, 1), [0, 1])  # mean 0.5, unbiased var 0.125
    victim = Net(8 ** 0.5, 3 - 0.5 * 8 ** 0.5)  # on aux: mean 3, var 8 * 0.125 = 1
    victim.bn.running_mean.fill_(2.0)
    victim.bn.running_var.fill_(4.0)
    purified = Net(72 ** 0.5, 10 - 0.5 * 72 ** 0.5)  # on aux: mean 10, var 72 * 0.125 = 9
    transfer_bn_statistics(purified, victim, aux, batch_size=None)
    assert float(purified.bn.running_mean) == pytest.approx(7.0, abs=1e-5)
    assert float(purified.bn.running_var) == pytest.approx(36.0, abs=1e-4)
    assert float(victim.bn.running_mean) == 2.0 and float(victim.bn.running_var) == 4.0  # untouched


def test_transfer_bn_statistics_moves_only_the_first_layers_when_asked():
    """Two BN layers in a row, the second on the first's output. With layers=1 the first is moved exactly as in the
    one-layer hand computation (mean 7, var 36) and the second keeps the statistics the model came with (5, 0.5),
    even though re-estimating on aux would have changed them."""
    from backdoorbench_gic.gic.defense import transfer_bn_statistics

    class Net(torch.nn.Module):
        def __init__(self, scale, shift):
            super().__init__()
            self.scale, self.shift = scale, shift
            self.bn = torch.nn.BatchNorm2d(1, eps=1e-12)
            self.bn2 = torch.nn.BatchNorm2d(1, eps=1e-12)

        def forward(self, x):
            return self.bn2(self.bn(x * self.scale + self.shift))

    aux = ImageSet(torch.tensor([0.25, 0.75]).view(2, 1, 1, 1), [0, 1])
    victim = Net(8 ** 0.5, 3 - 0.5 * 8 ** 0.5)
    victim.bn.running_mean.fill_(2.0)
    victim.bn.running_var.fill_(4.0)
    purified = Net(72 ** 0.5, 10 - 0.5 * 72 ** 0.5)
    purified.bn2.running_mean.fill_(5.0)
    purified.bn2.running_var.fill_(0.5)
    transfer_bn_statistics(purified, victim, aux, batch_size=None, layers=1)
    assert float(purified.bn.running_mean) == pytest.approx(7.0, abs=1e-5)
    assert float(purified.bn.running_var) == pytest.approx(36.0, abs=1e-4)
    assert float(purified.bn2.running_mean) == 5.0 and float(purified.bn2.running_var) == 0.5
    everything = Net(72 ** 0.5, 10 - 0.5 * 72 ** 0.5)
    everything.bn2.running_mean.fill_(5.0)
    transfer_bn_statistics(everything, victim, aux, batch_size=None)  # all layers: the second one moves too
    assert float(everything.bn2.running_mean) != 5.0


def test_bn_transfer_layers_is_refused_without_bn_transfer():
    with pytest.raises(ConfigError, match="bn_transfer_layers"):
        GICDefense(base="ft", placement="before", bn_transfer_layers=2)
    assert GICDefense(base="ft", placement="bn-transfer", bn_transfer_layers=2).config.bn_transfer_layers == 2


def test_direct_construction_leaves_the_base_its_own_defaults():
    """GICDefense(base=...) without from_sources: GIC's run-level defaults (epochs=10) must not reach a defense that
    refuses them (sau runs n_rounds); explicitly given run-level keys do reach the base."""
    d = GICDefense(base="sau", gic_steps=5, device="cpu")
    assert d.base.name == "sau" and d.run_config.epochs == d.base.config.epochs and d.run_config.device == "cpu"
    ft = GICDefense(base={"name": "ft", "epochs": 3}, ratio=0.01)
    assert ft.base.config.epochs == 3 and ft.base.config.ratio == 0.01 == ft.run_config.ratio
