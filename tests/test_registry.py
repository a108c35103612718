from importlib import metadata

import pytest

from backdoorbench_gic.registry import ALL_REGISTRIES, MODELS, Registry, UnknownNameError


def test_register_alias_build_and_names():
    reg = Registry("widget")

    @reg.register("alpha", aliases=["a", "first"])
    class Alpha:
        """The first widget."""

        def __init__(self, size=1):
            self.size = size

    @reg.register()
    def beta(size=2):
        return ("beta", size)

    assert reg.names() == ["alpha", "beta"]
    assert reg.names(include_aliases=True) == ["a", "alpha", "beta", "first"]
    assert reg.get("A") is Alpha and reg.get("first") is Alpha
    assert reg.build("alpha", size=5).size == 5
    assert reg.build({"type": "alpha", "size": 3}).size == 3
    assert reg.build({"type": "beta", "size": 3}, size=4) == ("beta", 4)  # explicit kwargs win over the dict
    assert "alpha" in reg and "a" in reg and "gamma" not in reg
    assert reg.aliases_of("alpha") == ["a", "first"]
    assert "The first widget." in reg.table()


def test_unknown_name_lists_known_names_and_suggests():
    reg = Registry("widget")
    reg.add("alpha", object)
    reg.add("beta", object)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("alpah")
    msg = str(exc.value)
    assert "unknown widget 'alpah'" in msg
    assert "'alpha'" in msg  # the suggestion
    assert "Known widgets: alpha, beta" in msg


def test_duplicate_registration_is_an_error_unless_forced():
    reg = Registry("widget")
    reg.add("alpha", int)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", float)
    reg.add("alpha", float, force=True)
    assert reg.get("alpha") is float


def test_spec_dict_needs_type():
    reg = Registry("widget")
    with pytest.raises(ValueError, match="'type'"):
        reg.build({"size": 1})


def test_entry_points_are_loaded_lazily(monkeypatch):
    calls = []

    class FakeEP:
        name = "plugin-widget"
        value = "somepkg:Widget"

        def load(self):
            calls.append(1)
            return dict

    def fake_entry_points(group=None):
        return [FakeEP()] if group == "backdoorbench_gic.widget" else []

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    reg = Registry("widget")
    assert calls == []  # nothing loaded at construction
    assert reg.get("plugin-widget") is dict
    assert calls == [1]
    assert "plugin-widget" in reg.names()


def test_broken_plugin_does_not_break_the_registry(monkeypatch, caplog):
    class BrokenEP:
        name = "broken"
        value = "nowhere:thing"

        def load(self):
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [BrokenEP()])
    reg = Registry("widget")
    reg.add("ok", int)
    assert reg.names() == ["ok"]
    assert "could not load widget entry point 'broken'" in caplog.text


def test_project_registries_are_filled_by_their_modules():
    assert {"preactresnet18", "resnet18", "vgg19_bn", "smallcnn"} <= set(MODELS.names())
    kinds = [r.kind for r in ALL_REGISTRIES]
    assert kinds == ["model", "dataset", "attack", "defense", "aux_source"]
