"""GIC's calibrators, objectives and fitting loop (no defense involved)."""
import copy

import pytest
import torch
import torch.nn as nn

from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.gic.calibrators import FAMILIES, bound_perturbation, build_calibrator
from backdoorbench_gic.utils.norms import project
from backdoorbench_gic.gic.drift import drift_report
from backdoorbench_gic.gic.fit import GICConfig, apply_calibrator, fit_calibrator
from backdoorbench_gic.bnstats import (BNBatchStats, NoBatchNormError, channel_moments, dataset_bn_divergence,
                                      layer_weights)
from backdoorbench_gic.models import build_model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_holds_for_random_inputs_and_parameters(family, norm):
    torch.manual_seed(0)
    delta = 0.05 if norm == "linf" else 0.7
    for trial in range(5):
        cal = build_calibrator(family, (3, 8, 8), delta, norm, hidden=4)
        with torch.no_grad():
            for p in cal.parameters():
                p.normal_(0, 3.0 * (trial + 1))  # far from the identity init
        x = torch.rand(16, 3, 8, 8)
        x[0] = 0.0
        x[1] = 1.0  # boundaries, where clipping acts
        d = cal(x) - x
        norms = d.abs().amax(dim=(1, 2, 3)) if norm == "linf" else d.flatten(1).norm(dim=1)
        assert (norms <= delta + 1e-6).all(), f"{family}/{norm}: max {norms.max():.6f} > {delta}"
        assert cal(x).min() >= 0 and cal(x).max() <= 1


def test_bound_helpers_by_hand():
    v = torch.tensor([[[[3.0, 4.0]]]])  # ||v|| = 5
    p = bound_perturbation(v, 1.0, "l2")
    assert torch.allclose(p.norm(), torch.tanh(torch.tensor(5.0)))
    assert torch.allclose(p / p.norm(), v / 5)
    assert torch.allclose(bound_perturbation(torch.zeros(1, 1, 1, 2), 0.1, "linf"), torch.zeros(1, 1, 1, 2))
    q = project(torch.tensor([[[[0.6, 0.8]]]]) * 2, "l2", 1.0)  # norm 2 -> 1
    assert torch.allclose(q, torch.tensor([[[[0.6, 0.8]]]]))
    assert torch.equal(project(torch.tensor([[[[0.3, -0.5]]]]), "linf", 0.2), torch.tensor([[[[0.2, -0.2]]]]))
    # one definition for both spellings: BackdoorBench's (SAU, i-BAU) and GIC's
    assert torch.equal(project(torch.tensor([[[[0.3, -0.5]]]]), "L_inf", 0.2), torch.tensor([[[[0.2, -0.2]]]]))
    assert torch.equal(project(torch.tensor([[[[1.2, 1.6]]]]), "L2", 1.0), q)
    with pytest.raises(ValueError, match="unknown norm 'l1'"):
        project(q, "l1", 1.0)


def test_generator_and_prompt_start_as_identity():
    x = torch.rand(4, 1, 6, 6)
    for family in FAMILIES:
        assert torch.allclose(build_calibrator(family, (1, 6, 6), 0.1)(x), x)


@pytest.fixture(scope="module")
def victim_and_data():
    """A small BN victim whose running statistics are those of its 'training' data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 12, 12, generator=g)
    train = (base * 0.6 + 0.2 + 0.1 * torch.randn(400, 1, 12, 12, generator=g)).clamp(0, 1)
    labels = torch.arange(400) % 4
    train[labels == 1, :, :4] += 0.2
    train = train.clamp(0, 1)
    victim = build_model("smallcnn", 4, "mnist", width=8)
    victim.train()
    for m in victim.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: running stats = training-data statistics
    with torch.no_grad():
        for i in range(0, 400, 100):
            victim(train[i:i + 100])
    victim.eval()
    return victim, ImageSet(train, labels)


def test_bn_divergence_near_zero_on_training_data_and_growing_with_noise(victim_and_data):
    victim, train = victim_and_data
    own, per_layer = dataset_bn_divergence(victim, train.images)
    assert own < 1e-3 and len(per_layer) == 5  # smallcnn has five BN layers
    values = []
    g = torch.Generator().manual_seed(1)
    for std in (0.05, 0.1, 0.2, 0.4):
        noisy = (train.images + std * torch.randn(train.images.shape, generator=g)).clamp(0, 1)
        values.append(dataset_bn_divergence(victim, noisy)[0])
    assert own < values[0] and all(a < b for a, b in zip(values, values[1:])), values


def test_fit_reduces_divergence_and_never_touches_the_victim(victim_and_data):
    victim, train = victim_and_data
    shifted = train.with_images((train.images * 0.6).clamp(0, 1))  # darker: a brightness shift
    before_weights = copy.deepcopy(victim.state_dict())
    flags = [p.requires_grad for p in victim.parameters()]
    cfg = GICConfig(delta=32 / 255, gic_steps=60, gic_batch_size=64, gic_lr=0.05, gic_patience=0)
    fit = fit_calibrator(victim, shifted, cfg, device=torch.device("cpu"), seed=0, progress=False)
    cal = apply_calibrator(fit.calibrator, shifted, torch.device("cpu"))
    d0 = dataset_bn_divergence(victim, shifted.images)[0]
    d1 = dataset_bn_divergence(victim, cal.images)[0]
    assert d1 < 0.7 * d0, (d0, d1)
    assert (cal.images - shifted.images).abs().max() <= 32 / 255 + 1e-6
    for k, v in victim.state_dict().items():
        assert torch.equal(v, before_weights[k]), k
    assert [p.requires_grad for p in victim.parameters()] == flags and not victim.training
    assert fit.steps == 60 and len(fit.history) == 60 and "bn" in fit.history[0]
    # only g's parameters were optimised
    assert all(p.grad is None for p in victim.parameters())


def test_fit_is_deterministic_under_a_seed(victim_and_data):
    victim, train = victim_and_data
    cfg = GICConfig(family="prompt+generator", gic_steps=10, gic_batch_size=32, gic_patience=0)
    a = fit_calibrator(victim, train, cfg, device=torch.device("cpu"), seed=3, progress=False)
    b = fit_calibrator(victim, train, cfg, device=torch.device("cpu"), seed=3, progress=False)
    for (ka, va), (kb, vb) in zip(a.calibrator.state_dict().items(), b.calibrator.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_early_stopping_stops_a_flat_objective(victim_and_data):
    victim, train = victim_and_data
    cfg = GICConfig(gic_steps=500, gic_patience=5, gic_batch_size=400, gic_lr=1e-9)
    fit = fit_calibrator(victim, train, cfg, device=torch.device("cpu"), progress=False)
    assert fit.steps < 500


def test_auto_delta_picks_from_the_grid(victim_and_data):
    victim, train = victim_and_data
    shifted = train.with_images((train.images * 0.5).clamp(0, 1))
    cfg = GICConfig(delta="auto", auto_delta_grid=[2 / 255, 8 / 255, 32 / 255], auto_delta_steps=15,
                    gic_steps=5, gic_batch_size=100, gic_patience=0)
    fit = fit_calibrator(victim, shifted, cfg, device=torch.device("cpu"), progress=False)
    assert fit.delta in cfg.auto_delta_grid and len(fit.delta_search) == 3
    reductions = [r["reduction"] for r in fit.delta_search]
    best = max(reductions)
    chosen = next(r for r in fit.delta_search if r["delta"] == fit.delta)
    assert chosen["reduction"] >= 0.9 * best
    assert all(r["reduction"] < 0.9 * best for r in fit.delta_search if r["delta"] < fit.delta)


def test_bn_objective_refused_without_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NoBatchNormError, match="infomax"):
        BNBatchStats(net)


def test_channel_moments_by_hand_and_against_var_mean():
    # one channel holding 1, 3, 5, 7: mean 4, unbiased variance (9 + 1 + 1 + 9) / 3
    x = torch.tensor([1.0, 3.0, 5.0, 7.0]).view(2, 1, 1, 2)
    mean, var = channel_moments(x, torch.tensor([0.0]))
    assert mean.item() == pytest.approx(4.0) and var.item() == pytest.approx(20 / 3)
    assert channel_moments(x, torch.tensor([3.5]))[1].item() == pytest.approx(20 / 3)  # the shift changes nothing
    # BatchNorm1d input (N, C), and a far-off mean with a small spread: the shift keeps float32 exact enough
    for shape, scale, offset in (((64, 5), 1.0, 0.0), ((16, 8, 6, 6), 0.1, 100.0)):
        x = (torch.randn(*shape, dtype=torch.float64) * scale + offset).requires_grad_(True)
        dims = [d for d in range(x.dim()) if d != 1]
        ref_var, ref_mean = torch.var_mean(x, dim=dims, correction=1)
        xf = x.detach().float().requires_grad_(True)
        mean, var = channel_moments(xf, torch.full((shape[1],), offset))
        assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(var.double(), ref_var, rtol=1e-4)
        w = torch.randn(shape[1], dtype=torch.float64)
        (ref_var * w).sum().add(ref_mean.sum()).backward()
        (var * w.float()).sum().add(mean.sum()).backward()
        assert torch.allclose(xf.grad.double(), x.grad, rtol=1e-3, atol=1e-5)


def test_layer_weights():
    assert torch.allclose(layer_weights(2, "uniform"), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(layer_weights(2, "early"), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(layer_weights(2, [3, 1]), torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError):
        layer_weights(3, [1, 2])


def test_config_validation_names_the_key():
    from backdoorbench_gic.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="'delta'"):
        build_config(GICConfig, [({"delta": -0.1}, "cli")])
    with pytest.raises(ConfigError, match="'family'"):
        build_config(GICConfig, [({"family": "magic"}, "cli")])
    assert build_config(GICConfig, [({"delta": "auto"}, "cli")]).delta == "auto"


def test_drift_report_flags_concentration():
    class Fixed(nn.Module):
        """Predicts class 2 when the mean pixel is above 0.5, else the class in pixel (0,0)."""

        def forward(self, x):
            bright = x.mean(dim=(1, 2, 3)) > 0.5
            cls = torch.where(bright, torch.full_like(bright, 2, dtype=torch.long), (x[:, 0, 0, 0] * 3).round().long())
            return nn.functional.one_hot(cls, 4).float()

    imgs = torch.zeros(8, 1, 2, 2)
    imgs[:, 0, 0, 0] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]) / 3
    raw = ImageSet(imgs, [0, 1, 0, 1, 0, 1, 0, 1])
    cal = raw.with_images(torch.ones_like(imgs))  # everything bright -> class 2
    rep = drift_report(Fixed(), raw, cal, 4, torch.device("cpu"))
    assert rep.drift_class == 2 and rep.drift_share == 1.0 and rep.concentrated
    assert rep.raw_pred_share[:2] == [0.5, 0.5]
    same = drift_report(Fixed(), raw, raw, 4, torch.device("cpu"))
    assert not same.concentrated


# -- objectives as registered classes, the calibration object -------------------------------------------------------
class TinyVictim(nn.Module):
    """features(x) = the first two pixels; head: a fixed linear layer over 3 classes."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))

    def features(self, x):
        return x.flatten(1)[:, :2]

    def forward(self, x):
        return self.head(self.features(x))


def _tiny_set(points, labels):
    x = torch.zeros(len(points), 1, 1, 2)
    x[:, 0, 0, :] = torch.tensor(points, dtype=torch.float32)
    return ImageSet(x, labels)


def test_objectives_registry_validates_names_and_options():
    from backdoorbench_gic.config import ConfigError, build_config
    from backdoorbench_gic.gic.objectives import OBJECTIVES, parse_objectives

    assert {"bn", "ce", "infomax", "drift", "feature", "guard"} <= set(OBJECTIVES.names())
    assert parse_objectives({"bn": 1, "feature": {"weight": 0.5, "top": 0.1}}) == {
        "bn": (1.0, {}), "feature": (0.5, {"top": 0.1})}
    with pytest.raises(ConfigError, match="'objectives'.*bnn"):
        build_config(GICConfig, [({"objectives": {"bnn": 1.0}}, "cli")])
    with pytest.raises(ConfigError, match="no option 'topp'"):
        parse_objectives({"feature": {"topp": 0.1}})
    with pytest.raises(ConfigError, match="weight > 0"):
        parse_objectives({"bn": 0.0})


def test_feature_objective_by_hand():
    from backdoorbench_gic.gic.objectives import FeatureObjective, Forward

    victim = TinyVictim()
    # class 0: (0.9, 0.1) and (0.6, 0.2) both correct, the first more confident; class 1: (0.1, 0.8) correct,
    # (0.5, 0.4) misclassified (logit 0.5 > 0.4) and so never a prototype
    aux = _tiny_set([[0.9, 0.1], [0.6, 0.2], [0.1, 0.8], [0.5, 0.4]], [0, 0, 1, 1])
    obj = FeatureObjective(victim, aux, torch.device("cpu"), 3, top=0.5)
    assert torch.allclose(obj.protos[0], torch.tensor([0.9, 0.1])) and torch.allclose(obj.protos[1], torch.tensor([0.1, 0.8]))
    assert obj.present.tolist() == [True, True, False]
    feats = torch.tensor([[0.5, 0.5], [0.7, 0.1], [0.1, 0.6]])
    f = torch.tensor([[0.9, 0.1], [0.6, 0.2], [0.1, 0.8], [0.5, 0.4]])
    scale = f.var(0, unbiased=False).mean()
    # class 0 batch mean (0.6, 0.3) vs (0.9, 0.1): squares 0.09, 0.04; class 1 (0.1, 0.6) vs (0.1, 0.8): 0, 0.04
    expected = torch.tensor((0.09 + 0.04 + 0.0 + 0.04) / 4) / scale
    got = obj(Forward(victim.head(feats), feats, torch.tensor([0, 0, 1])))
    assert torch.allclose(got, expected, atol=1e-6)


def test_trigger_guard_infers_the_over_predicted_class_by_hand():
    from backdoorbench_gic.gic.objectives import Forward, TriggerGuard

    victim = TinyVictim()
    # labels 0,0,1,2 (shares .5 .25 .25); predictions: 1, 1, 1, 0 -> shares .25 .75 0: class 1 gains +0.5
    aux = _tiny_set([[0.1, 0.9], [0.2, 0.8], [0.0, 0.5], [0.6, 0.1]], [0, 0, 1, 2])
    guard = TriggerGuard(victim, aux, torch.device("cpu"), 3)
    assert guard.target == 1 and guard.excess == pytest.approx(0.5)
    logits = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]))
    out = Forward(logits, torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    assert float(guard(out)) == pytest.approx((0.7 + 0.3) / 2, abs=1e-6)  # the image labelled 1 is left out


def test_gic_object_fit_call_state_roundtrip(victim_and_data, tmp_path, monkeypatch):
    from backdoorbench_gic.gic.calibration import GIC

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path))
    victim, data = victim_and_data
    aux = data.subset(torch.arange(64)).with_images((data.subset(torch.arange(64)).float_images() * 0.6))
    gic = GIC(delta=8 / 255, gic_steps=10, gic_batch_size=32, objectives={"bn": 1.0, "guard": 0.5})
    with pytest.raises(RuntimeError, match="not fitted"):
        gic(aux.float_images())
    gic.fit(victim, aux, device="cpu", seed=1)
    out = gic.transform(aux)
    assert torch.allclose(gic(aux.float_images()), out.images)
    assert (out.images - aux.float_images()).abs().amax() <= 8 / 255 + 1e-6
    assert gic.summary["bn_div_after"] < gic.summary["bn_div_before"] and "D_BN" in gic.describe()
    path = tmp_path / "g.pt"
    torch.save(gic.state_dict(), path)
    again = GIC().load_state_dict(torch.load(path, weights_only=True))
    assert again.config == gic.config and torch.equal(again(aux.float_images()), gic(aux.float_images()))


def test_cache_key_covers_every_identity_field(victim_and_data):
    from dataclasses import fields

    from backdoorbench_gic.gic.calibration import fit_key

    victim, data = victim_and_data
    aux = data.subset(torch.arange(8))
    base = GICConfig()
    key = fit_key(victim, aux, base, 0)
    changed = {"family": "generator", "norm": "l2", "delta": 0.1, "objectives": {"bn": 2.0}, "gic_lr": 0.1,
               "gic_steps": 3, "gic_batch_size": 5, "gic_patience": 2, "generator_hidden": 4, "per_source": True,
               "auto_delta_grid": [0.1], "auto_delta_steps": 3, "auto_delta_tol": 0.2}
    identity = [f.name for f in fields(GICConfig) if f.metadata.get("identity", True)]
    assert sorted(identity) == sorted(changed), "a new GICConfig field needs a value here"
    for k, v in changed.items():
        cfg = GICConfig(**{**base.__dict__, k: v})
        assert fit_key(victim, aux, cfg, 0) != key, k
    assert fit_key(victim, aux, GICConfig(gic_cache=False, drift_warn_ratio=3.0), 0) == key
    assert fit_key(victim, aux, base, 1) != key
