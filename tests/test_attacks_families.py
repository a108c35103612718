"""WaNet's warp field, the Input-aware generator and the low-frequency trigger: their defining properties, checked
against hand-computed values, and their records' round trip."""
import pytest
import torch

from backdoorbench_gic.attacks import InputAware, LowFrequency, WaNet, run_attack
from backdoorbench_gic.attacks.inputaware import TriggerGenerator, compose, diversity_loss
from backdoorbench_gic.attacks.lowfreq import craft_low_frequency_trigger, fit_bound, frequency_window, low_pass
from backdoorbench_gic.attacks.triggers import identity_grid, wanet_grid, wanet_noise_grid
from backdoorbench_gic.config import ConfigError
from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.data.transforms import nhwc_to_nchw
from backdoorbench_gic.evaluation import evaluate
from backdoorbench_gic.models import build_model
from backdoorbench_gic.inspection import inspect_record
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.results import read_summary_last
from backdoorbench_gic.testing import class_images, make_mnist_like

FAST = dict(dataset="fashion-mnist", width=8, epochs=1, batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_root")
    make_mnist_like(root / "data" / "fashion-mnist", n_train=200, n_test=100)
    return root


def tiny_set(n: int, seed: int = 0) -> ImageSet:
    x, y = class_images(n, 10, 28, 28, 1, seed)
    return ImageSet(nhwc_to_nchw(x), y)


# ---------------------------------------------------------------------------------------------------------
# WaNet: the warp field is smooth and bounded
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.5, WaNet(dataset="fashion-mnist").config.s])
def test_wanet_displacement_is_the_scaled_field_and_bounded(s):
    noise = wanet_noise_grid(28, 28, 4, torch.Generator().manual_seed(3))
    px = (wanet_grid(noise, s) - identity_grid(28, 28)) * 27 / 2  # grid units -> pixels (align_corners=True)
    inside = (identity_grid(28, 28) + s * noise / 28).abs().amax(-1) < 1  # where the clip did not act
    # hand: the grid moves by s * field / 28 grid units, one pixel is 2 / 27 units -> s * field * 27 / 56 px
    assert torch.allclose(px[inside], (s * noise * 27 / 56)[inside], atol=1e-5)
    assert px.abs().max() <= s * noise.abs().max() * 27 / 56 + 1e-5


def test_wanet_field_is_smooth_a_bicubic_k_by_k_surface():
    noise = wanet_noise_grid(28, 28, 4, torch.Generator().manual_seed(3))[0]  # 28 x 28 x 2
    span = noise.amax((0, 1)) - noise.amin((0, 1))
    step = torch.maximum((noise[1:] - noise[:-1]).abs().amax((0, 1)), (noise[:, 1:] - noise[:, :-1]).abs().amax((0, 1)))
    # control points 9 px apart: a neighbour step is a small part of the field's range (white noise: about all of it)
    assert (step < 0.3 * span).all()
    spec = torch.fft.fft2(noise.permute(2, 0, 1).double()).abs().pow(2)
    low = frequency_window(28, 28, 4)
    assert spec[:, low].sum() / spec.sum() > 0.9  # the energy sits in the k-lowest frequencies (94 % here)
    white = torch.fft.fft2(torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0)).double() - 0.5)
    assert white.abs().pow(2)[:, low].sum() / white.abs().pow(2).sum() < 0.2  # while white noise does not


# ---------------------------------------------------------------------------------------------------------
# Input-aware: composition, diversity, sample-specific triggers
# ---------------------------------------------------------------------------------------------------------
def test_compose_and_diversity_by_hand():
    x, p = torch.full((1, 1, 2, 2), 0.2), torch.full((1, 1, 2, 2), 1.0)
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    assert torch.allclose(compose(x, p, m), torch.tensor([[[[0.2, 1.0], [0.6, 0.4]]]]))
    x1, x2 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # rms distance 1
    t1, t2 = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)  # rms distance 0.5
    assert float(diversity_loss(x1, x2, t1, t2)) == pytest.approx(2.0)
    with torch.no_grad():
        mask = TriggerGenerator(1, 1, 4, sharp=20.0)(torch.rand(3, 1, 28, 28))
    assert mask.shape == (3, 1, 28, 28) and float(mask.min()) >= 0 and float(mask.max()) <= 1


def test_input_aware_mask_pretraining_meets_density_and_triggers_are_per_sample():
    attack = InputAware(dataset="fashion-mnist", batch_size=32, mask_epochs=8, generator_width=4, lr_M=0.02,
                        random_seed=1).setup()
    data = tiny_set(128)
    with torch.no_grad():
        before = float(attack.netM(data.images[:64].float() / 255).mean())
    attack.prepare_training(data, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    x = data.images[:64]
    with torch.no_grad():
        after = float(attack.netM(x.float() / 255).mean())
    assert before > 0.2 and after < 0.1  # pushed from about half the image towards the 0.032 density
    own, cross = attack.apply_trigger(x, train=False).float(), attack.apply_cross(x).float()
    trig = (own - x.float()).flatten(1)  # each image's own trigger
    assert not torch.equal(own, cross)  # another image's trigger is a different perturbation
    pair = torch.cdist(trig, trig)
    assert float(pair[~torch.eye(len(x), dtype=torch.bool)].min()) > 0  # no two images share a trigger


def test_input_aware_validation_names_the_key():
    with pytest.raises(ConfigError, match="mask_density"):
        InputAware(dataset="fashion-mnist", mask_density=0)
    with pytest.raises(ConfigError, match="pratio"):
        InputAware(dataset="fashion-mnist", pratio=0.6, cross_ratio=1)


def test_input_aware_record_round_trip(fm_root):
    cfg = dict(attack="inputaware", save_folder_name="ia_run", mask_epochs=1, generator_width=4, **FAST)
    attack = InputAware(**{k: v for k, v in cfg.items() if k != "attack"})
    d = run_attack(attack, bb_root=fm_root, progress=False)
    rec = load_attack_record(d, fm_root)
    entries = rec.bd_train_state.entries
    bd = set(attack.select_train_indices(rec.clean_train.labels).tolist())
    assert len(entries) == 40 and all(entries[i][1] == 0 for i in bd)  # pratio x N backdoor + as many cross
    assert all(b == o for i, (_, b, o) in entries.items() if i not in bd)  # cross samples keep their labels
    assert sum(1 for _ in (d / "cross_test_dataset").rglob("*.png")) == 100
    # a fresh attack with the saved generators regenerates the stored bd_test pixels exactly
    fresh = InputAware(dataset="fashion-mnist", generator_width=4).load_extras(d)
    assert torch.equal(fresh.poison_test(rec.clean_test)[0].images, rec.bd_test.images)
    assert inspect_record(d, fm_root, evaluate=True).valid
    last = read_summary_last(d / "attack_df_summary.csv")
    m = evaluate(rec.build_model(), rec.clean_test, rec.bd_test, batch_size=512)
    assert (m.acc, m.asr) == (last["test_acc"], last["test_asr"])  # the logged row is the stored triggers' row


# ---------------------------------------------------------------------------------------------------------
# Low-frequency trigger: the spectrum stays below the cut-off
# ---------------------------------------------------------------------------------------------------------
def test_frequency_window_and_low_pass_by_hand():
    w = frequency_window(8, 8, 1)  # integer frequencies 0, 1, 2, 3, -4, -3, -2, -1: |f| <= 1 at indices 0, 1, 7
    assert w.sum() == 9 and w[0, 0] and w[1, 7] and w[7, 1] and not w[2, 0] and not w[0, 4]
    j = torch.arange(8, dtype=torch.float64)
    slow = torch.cos(2 * torch.pi * j / 8).expand(8, 8)  # frequency 1 along x: kept
    fast = torch.cos(2 * torch.pi * 2 * j / 8).expand(8, 8)  # frequency 2: removed
    assert torch.allclose(low_pass(slow, 1), slow, atol=1e-12)
    assert torch.allclose(low_pass(fast, 1), torch.zeros(8, 8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(low_pass(slow + fast, 1), slow, atol=1e-12)
    t = torch.tensor([0.5, -0.2])
    assert torch.equal(fit_bound(t, 0.25), torch.tensor([0.25, -0.1])) and torch.equal(fit_bound(t, 1.0), t)


def test_crafted_trigger_is_bounded_low_pass_and_pushes_to_the_target():
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, "fashion-mnist", width=4).eval()
    images = tiny_set(64).images
    trig = craft_low_frequency_trigger(model, images, 3, eps=0.1, cutoff=2, steps=15, lr=0.02, batch_size=32,
                                       generator=torch.Generator().manual_seed(0))
    assert trig.shape == (1, 28, 28) and 0 < float(trig.abs().max()) <= 0.1 + 1e-7
    spec = torch.fft.fft2(trig.double()).abs()
    assert float(spec[:, ~frequency_window(28, 28, 2)].max()) < 1e-6 * float(spec.max())  # float32 rounding only
    x = images.float() / 255
    loss = lambda d: float(torch.nn.functional.cross_entropy(model((x + d).clamp(0, 1)),  # noqa: E731
                                                             torch.full((len(x),), 3)))
    assert loss(trig) < loss(torch.zeros_like(trig))


def test_lf_record_round_trip_and_trigger_reuse(fm_root):
    d = run_attack({"attack": "lf", "save_folder_name": "lf_run", "craft_steps": 5, "surrogate_epochs": 1,
                    "cutoff": 2, **FAST}, bb_root=fm_root, progress=False)
    rec = load_attack_record(d, fm_root)
    assert rec.bd_train_state.poison_indicator.sum() == 20 and (d / "train_poison_index_list.pickle").is_file()
    saved = torch.load(d / "lf_trigger.pt", weights_only=True)
    assert saved["cutoff"] == 2 and 0 < float(saved["trigger"].abs().max()) <= saved["eps"] + 1e-7
    reuse = LowFrequency(dataset="fashion-mnist", trigger_path=str(d / "lf_trigger.pt")).setup(fm_root)
    assert torch.equal(reuse.poison_test(rec.clean_test)[0].images, rec.bd_test.images)
    restored = LowFrequency(dataset="fashion-mnist").load_extras(d)
    assert torch.equal(restored.trigger, reuse.trigger)
    assert inspect_record(d, fm_root, evaluate=True).valid
    with pytest.raises(FileNotFoundError, match="surrogate_record"):
        run_attack({"attack": "lf", "save_folder_name": "lf_missing", "surrogate_record": "nowhere", **FAST},
                   bb_root=fm_root, progress=False)
