"""PAM (path-aware minimization): its update by hand on a tiny model, its BatchNorm handling, its registration and
yamls, and its defining property against FT on a victim that carries a backdoor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from backdoorbench_gic.config import ConfigError, read_yaml
from backdoorbench_gic.data.imageset import Batch, ImageSet
from backdoorbench_gic.data.transforms import TrainAugment
from backdoorbench_gic.defenses import PAM
from backdoorbench_gic.defenses.pam import path_coordinate, path_perturbation
from backdoorbench_gic.evaluation import evaluate
from backdoorbench_gic.registry import DEFENSES
from backdoorbench_gic.resources import defense_configs_dir

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_path_perturbation_by_hand():
    # w = ([3, 0], [0, 4]), w_0 = 0: d = w_0 - w, ||d|| = 5, e = rho * d / 5
    w = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
    e = path_perturbation(w, [torch.zeros(2), torch.zeros(2)], rho=1.0)
    assert torch.allclose(e[0], torch.tensor([-0.6, 0.0])) and torch.allclose(e[1], torch.tensor([0.0, -0.8]))
    e = path_perturbation(w, [torch.tensor([3.0, 1.0]), torch.tensor([0.0, 4.0])], rho=0.5)  # d = (0, 1), (0, 0)
    assert torch.allclose(e[0], torch.tensor([0.0, 0.5])) and torch.allclose(e[1], torch.zeros(2))
    assert all(torch.equal(t, torch.zeros(2)) for t in path_perturbation(w, [t.clone() for t in w], rho=1.0))


def _tiny():
    """A linear classifier on 2 x 1 x 1 'images' (no BatchNorm): logits = W x + b."""
    return nn.Sequential(nn.Flatten(), nn.Linear(2, 2))


def _softmax_ce_grad(W, b, x, y):
    """Mean cross-entropy gradient of logits W x + b, by hand: (softmax(z) - onehot(y)) x^T averaged."""
    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p.T @ x / len(y), p.mean(0)


def test_one_step_by_hand():
    """w = (W, b) = ([[1, 0], [0, 1]], [0, 0]), victim w_0 = ([[1, 1], [0, 1]], [0, 0.5]): d = w_0 - w = (0, 1, 0, 0,
    0, 0.5) in (W11, W12, W21, W22, b1, b2) order, ||d|| = sqrt(1.25); rho = 0.5 puts the gradient's point at
    w + 0.5 d / ||d||; plain SGD (lr 0.1, no momentum, no decay) then steps from w with that gradient."""
    pam = PAM(epochs=1, batch_size=2, lr=0.1, sgd_momentum=0.0, wd=0.0, rho=0.5, lr_scheduler="none")
    x = torch.tensor([[[[1.0]], [[2.0]]], [[[-1.0]], [[0.5]]]])  # two images of 2 x 1 x 1
    y = torch.tensor([0, 1])
    net = _tiny()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net[1].bias.copy_(torch.tensor([0.0, 0.0]))
    run = pam.start(net, ImageSet(torch.zeros(2, 2, 1, 1), y), device=CPU)
    pam.setup(run)
    run.anchor = [torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([0.0, 0.5])]
    run.optimizer = pam.build_optimizer(run)
    batch = Batch(x, y, torch.arange(2), torch.zeros(2), y, torch.zeros(2))
    loss, logits = pam.step(run, run.net, batch)

    W, b = np.eye(2), np.zeros(2)
    d = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    e = 0.5 * d / math.sqrt(1.25)
    We, be = W + e[:4].reshape(2, 2), b + e[4:]
    xs = x.reshape(2, 2).numpy().astype(np.float64)
    gW, gb = _softmax_ce_grad(We, be, xs, y.numpy())
    assert np.allclose(run.net[1].weight.detach().numpy(), W - 0.1 * gW, atol=1e-6)
    assert np.allclose(run.net[1].bias.detach().numpy(), b - 0.1 * gb, atol=1e-6)
    # the logged loss and logits are those at w, not at the perturbed point
    assert np.allclose(logits.numpy(), xs @ W.T + b)
    z = xs @ W.T + b
    assert float(loss) == pytest.approx(float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(2), y.numpy()])), rel=1e-6)


def test_first_step_is_a_plain_fine_tuning_step():
    """At w = w_0 the path has no direction (e = 0): PAM's first step is FT's."""
    torch.manual_seed(0)
    net = _tiny()
    x, y = torch.randn(4, 2, 1, 1), torch.tensor([0, 1, 1, 0])
    data = ImageSet(x.clamp(0, 1), y)
    kw = dict(epochs=1, batch_size=4, lr=0.1, lr_scheduler="none")
    a = DEFENSES.get("pam")(**kw).purify(net, data, device=CPU)
    b = DEFENSES.get("ft")(**kw).purify(net, data, device=CPU)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-7)


def test_batchnorm_statistics_come_from_the_weights_not_the_perturbed_point():
    """One step on a BatchNorm net: the running statistics are those one train-mode pass at w leaves (the pass at
    w + e keeps them frozen)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(3, 2))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 2, (8,))
    pam = PAM(epochs=1, batch_size=8, lr=0.1, rho=0.3)
    run = pam.start(net, ImageSet(x, y), device=CPU)
    pam.setup(run)
    with torch.no_grad():  # move w off the victim so that e != 0
        for p in run.params:
            p.add_(0.05)
    expected = pam.copy_model(run.net, CPU).train()
    with torch.no_grad():
        expected(x)
    run.optimizer = pam.build_optimizer(run)
    run.net.train()
    pam.step(run, run.net, Batch(x, y, torch.arange(8), torch.zeros(8), y, torch.zeros(8)))
    assert torch.allclose(run.net[1].running_mean, expected[1].running_mean)
    assert torch.allclose(run.net[1].running_var, expected[1].running_var)


def test_registered_with_gic_alias_and_validated():
    assert DEFENSES.resolve("pam") == "pam" and DEFENSES.resolve("path-aware-minimization") == "pam"
    assert DEFENSES.get("gic-pam").default_base == "pam"
    gic = DEFENSES.get("gic-pam").from_sources("cifar10", cli={"epochs": 2})
    assert type(gic.base).__name__ == "PAM" and gic.base.config.rho == 0.5 and gic.base.config.epochs == 2
    with pytest.raises(ConfigError, match="'rho'"):
        PAM(rho=-1)
    assert PAM.augment and PAM().prefix == "pam"


def test_yamls_match_ft_plus_rho():
    root = defense_configs_dir()
    names = {p.name for p in (root / "ft").glob("*.yaml")}
    assert names == {p.name for p in (root / "pam").glob("*.yaml")}
    for name in sorted(names):
        ft, pam = read_yaml(root / "ft" / name), read_yaml(root / "pam" / name)
        assert pam == {**ft, "rho": 0.5}, name
        cfg = DEFENSES.get("pam").from_sources(None, yaml_path=str(root / "pam" / name)).config
        assert all(getattr(cfg, k) == v for k, v in pam.items()), name


@pytest.fixture()
def victim(backdoored_record):
    rec = backdoored_record
    return {"model": rec.build_model().eval(), "aux": rec.clean_train.subset(range(160)), "rec": rec}


def test_pam_moves_further_along_the_victim_to_purified_path_than_ft(victim):
    """The defining property. Same budget (data, epochs, batch, learning rate, seed); the path coordinate of a model
    w is <w - w_0, u> with u = (w_FT - w_0) / ||w_FT - w_0||, the unit direction from the victim w_0 to FT's purified
    model, over the trainable parameters: FT's own coordinate is its distance ||w_FT - w_0||, and PAM's (rho 0.5)
    must exceed it by a clear margin (measured: 0.98 against 0.74 after two epochs)."""
    model, aux = victim["model"], victim["aux"]
    kw = dict(epochs=2, batch_size=32, random_seed=0)
    ft = DEFENSES.get("ft")(**kw).purify(model, aux, device=CPU, train_augment=TrainAugment(4, True)).model
    pam = DEFENSES.get("pam")(**kw, rho=0.5).purify(model, aux, device=CPU, train_augment=TrainAugment(4, True))
    s_ft, s_pam = path_coordinate(ft, model, ft), path_coordinate(pam.model, model, ft)
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert s_ft == pytest.approx(float((torch.cat([p.detach().flatten() for p in ft.parameters()]) - w0).norm()),
                                 rel=1e-5)
    assert s_pam > 1.15 * s_ft, (s_pam, s_ft)
    assert pam.extras["distance_to_victim"] >= s_pam - 1e-4  # a projection never exceeds the length
    rec = victim["rec"]
    after = evaluate(pam.model, rec.clean_test, rec.bd_test)
    assert after.acc >= 0.8 and after.asr <= 0.5, after  # and it still purifies
