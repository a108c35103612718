"""The shift transforms: exact parameters, identities, determinism, and the noise clamp/wrap parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoorbench_gic.auxdata.shifts import (ER_SHIFTS, Brightness, Noise, ShiftApplier, add_noise, image_seed,
                                          make_shift, parse_tv_spec, quantize, shift_images)


def rgb(n=6, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_quantize_clamp_and_wrap_by_hand():
    x = torch.tensor([-0.01, 0.0, 100 / 255 + 0.05, 1.05, 1.3, -1.2, 1.0])
    # clamp: clip to [0,1], round;  112.75 -> 113
    assert quantize(x, "clamp").tolist() == [0, 0, 113, 255, 255, 0, 255]
    # wrap (x.mul(255).byte()): truncate toward zero, keep 8 bits: -2.55 -> -2 -> 254; 267.75 -> 267 -> 11;
    # 331.5 -> 331 -> 75; -306 -> 206
    assert quantize(x, "wrap").tolist() == [254, 0, 112, 11, 75, 206, 255]
    assert quantize(x, "wrap").tolist() == x.mul(255).byte().tolist()  # what BackdoorBenchER's ToPILImage does


def test_noise_clamp_versus_wrap_at_hand_picked_pixels():
    img = torch.tensor([[[250, 3, 100, 128]]], dtype=torch.uint8).float() / 255  # 1 x 1 x 4
    noise = torch.tensor([[[1.0, -1.0, 0.5, 0.0]]])
    y = add_noise(img, noise, 0.1)
    # 250/255 + 0.1 = 1.0804 (275.5); 3/255 - 0.1 = -0.0882 (-22.5); 100/255 + 0.05 (112.75); 128 unchanged
    assert quantize(y, "clamp").flatten().tolist() == [255, 0, 113, 128]
    assert quantize(y, "wrap").flatten().tolist() == [19, 234, 112, 128]
    # the shift object picks the mode from its option
    assert Noise(0.1).quantize_mode == "clamp" and Noise(0.1, wrap=True).quantize_mode == "wrap"


def test_noise_wrap_end_to_end():
    imgs = torch.full((1, 1, 32, 32), 250, dtype=torch.uint8)  # bright: 0.1 noise overflows often
    clamp = shift_images(imgs, "noise")
    wrap = shift_images(imgs, "noise_wrap")  # the same draws (seed key "noise"), wrapped
    assert clamp.max() == 255 and (clamp == 255).sum() > 100
    assert (wrap < 100).sum() > 100  # wrapped-around pixels: 256 + k -> k
    g = torch.Generator().manual_seed(image_seed(0, "noise", 0))  # image 0's own generator
    y = imgs[0].float() / 255 + 0.1 * torch.randn((1, 32, 32), generator=g)
    assert torch.equal(wrap[0], quantize(y, "wrap")) and torch.equal(clamp[0], quantize(y, "clamp"))


def test_brightness_factor_one_is_the_identity():
    imgs = rgb()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(quantize(Brightness((1.0, 1.0))(imgs[0].float() / 255, g)), imgs[0])
    assert torch.equal(shift_images(imgs, "brightness", options={"brightness_range": (1, 1)}), imgs)
    assert torch.equal(shift_images(imgs, "contrast", options={"contrast_range": (1, 1)}), imgs)
    assert torch.equal(shift_images(imgs, "rotation", options={"rotation_degrees": (0, 0)}), imgs)
    assert torch.equal(shift_images(imgs, "noise", options={"noise_std": 0.0}), imgs)


def test_brightness_factor_two_by_hand():
    imgs = torch.tensor([0, 50, 100, 200], dtype=torch.uint8).view(1, 1, 2, 2)
    out = shift_images(imgs, "brightness", options={"brightness_range": (2, 2)})
    assert out.flatten().tolist() == [0, 100, 200, 255]


def test_blur_keeps_a_constant_image_and_rotation_fills_black():
    const = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(shift_images(const, "gaussian_blur"), const)
    white = torch.full((1, 1, 16, 16), 255, dtype=torch.uint8)
    rot = shift_images(white, "rotation", options={"rotation_degrees": (30, 30)})
    assert rot[0, 0, 0, 0] == 0 and rot[0, 0, 8, 8] == 255


@pytest.mark.parametrize("name", [*ER_SHIFTS, "jpeg", "tv"])
def test_every_shift_is_deterministic_under_a_seed(name):
    imgs = rgb()
    arg = "RandomErasing(p=1.0)|RandomAffine(degrees=20)" if name == "tv" else None
    a = shift_images(imgs, name, shift_seed=0, arg=arg)
    b = shift_images(imgs, name, shift_seed=0, arg=arg)
    assert a.dtype == torch.uint8 and a.shape == imgs.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, imgs)
    if name != "jpeg":  # JPEG re-encoding has no random parameter
        assert not torch.equal(a, shift_images(imgs, name, shift_seed=1, arg=arg))


@pytest.mark.parametrize("name", ER_SHIFTS)
def test_shift_of_an_image_does_not_depend_on_the_others(name):
    imgs = rgb(n=10)
    whole = shift_images(imgs, name, shift_seed=5)
    part = shift_images(imgs[[7, 2]], name, shift_seed=5, positions=np.array([7, 2]))
    assert torch.equal(part, whole[[7, 2]])


def test_color_jitter_on_grey_images_and_float_output():
    grey = rgb(c=1)
    out = shift_images(grey, "color_jitter")
    assert out.shape == grey.shape
    f = ShiftApplier(make_shift("contrast"), "contrast", 0, quantize=False)(grey, np.arange(len(grey)))
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's JPEG codec notice
def test_tv_specs_are_checked():
    assert parse_tv_spec("RandomErasing(p=1.0, scale=(0.02, 0.1))|GaussianBlur(3)") == [
        ("RandomErasing", (), {"p": 1.0, "scale": (0.02, 0.1)}), ("GaussianBlur", (3,), {})]
    with pytest.raises(ValueError, match="not a torchvision.transforms.v2 transform"):
        parse_tv_spec("Nonsense(1)")
    with pytest.raises(ValueError, match="literals"):
        parse_tv_spec("GaussianBlur(__import__('os'))")
    with pytest.raises(ValueError, match="changed the image shape"):
        shift_images(rgb(), "tv", arg="Resize(8)")
    jpeg = shift_images(rgb(), "tv", arg="JPEG(quality=20)")  # a uint8-only transform
    assert jpeg.dtype == torch.uint8


def test_bad_parameters_are_errors():
    with pytest.raises(ValueError, match="low <= high"):
        make_shift("brightness", {"brightness_range": (1.5, 0.5)})
    with pytest.raises(ValueError, match="odd"):
        make_shift("gaussian_blur", {"blur_kernel": 4})
    with pytest.raises(ValueError, match="unknown shift"):
        make_shift("fog")
