import pytest
import torch

from backdoorbench_gic.models import VictimModel, build_model, build_model_for_state_dict, infer_arch_kwargs


def test_preactresnet18_has_backdoorbench_parameter_names():
    net = build_model("preactresnet18", 10)
    keys = list(net.state_dict())
    assert len(keys) == 102  # as in genuine BackdoorBench records (num_batches_tracked included)
    assert keys[0] == "conv1.weight" and keys[-2:] == ["linear.weight", "linear.bias"]
    for k in ("layer2.0.shortcut.0.weight", "layer3.1.bn2.running_var", "layer4.1.conv2.weight"):
        assert k in keys
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut in layer1
    assert not any(k.startswith(("bn.", "bn_final")) for k in keys)  # no BatchNorm after layer4
    assert net.conv1.weight.shape == (64, 3, 3, 3) and net.linear.weight.shape == (10, 512)
    assert sum(p.numel() for p in net.parameters()) == 11_171_146


def test_state_dict_saved_under_backdoorbench_names_loads_strictly():
    src = build_model("preactresnet18", 43)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    dst = build_model_for_state_dict("preactresnet18", 43, state, "gtsrb")
    dst.net.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 32, 32)
    src.eval(), dst.eval()
    assert torch.allclose(src(x), dst(x))  # gtsrb normalisation is the identity


def test_width_and_channels_are_inferred_from_state_dict():
    net = build_model("preactresnet18", 10, in_channels=1, width=16)
    assert infer_arch_kwargs("preactresnet18", net.state_dict()) == {"in_channels": 1, "width": 16}
    again = build_model_for_state_dict("preactresnet18", 10, net.state_dict(), "fashion-mnist")
    again.net.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["preactresnet18", "smallcnn", "resnet18", "vgg19_bn"])
def test_any_channel_count_and_features(name):
    model = build_model(name, 7, "mnist", width=8 if name in ("preactresnet18", "smallcnn") else None)
    side = 32 if name == "vgg19_bn" else 28  # VGG's five poolings need at least 32 pixels
    x = torch.rand(3, 1, side, side)
    model.eval()
    assert model(x).shape == (3, 7)
    feats = model.features(x)
    assert torch.allclose(model.head(feats), model(x), atol=1e-5)


def test_wrapper_normalises_and_keeps_bare_state_dict():
    net = build_model("smallcnn", 10, in_channels=3)
    model = VictimModel(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert list(model.bare_state_dict()) == list(net.state_dict())
    assert "mean" not in model.state_dict() and "net.stem.0.weight" in model.state_dict()
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)


def test_width_option_refused_where_absent():
    with pytest.raises(ValueError, match="no width option"):
        build_model("resnet18", 10, width=16)
