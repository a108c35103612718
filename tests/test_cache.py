"""The one content key of weights, image sets and settings, and the one way a cache entry is read or made."""
import hashlib
import json

import pytest
import torch

from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.utils.cache import content_key, hash_weights, load_or_compute


def _set(**changes) -> ImageSet:
    fields = dict(images=torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2), labels=[0, 1],
                  original_labels=[0, 1], poison=[0, 0], indices=[5, 7], sources=[0, 0], source_names=["reserved"])
    fields.update(changes)
    return ImageSet(**fields)


def test_every_part_of_an_image_set_enters_its_key():
    key = content_key(data=[_set()])
    assert content_key(data=[_set()]) == key and len(key) == 20
    others = [_set(labels=[1, 1]), _set(original_labels=[1, 1]), _set(poison=[0, 1]), _set(indices=[5, 8]),
              _set(sources=[0, 1], source_names=["reserved", "noise"]), _set(source_names=["train"]),
              _set(images=_set().images.flip(0)), _set(images=_set().images.float() / 255),
              _set(images=_set().images.reshape(2, 3, 4, 1))]
    keys = {content_key(data=[s]) for s in others}
    assert key not in keys and len(keys) == len(others)
    assert content_key(data=[_set(), None]) == key  # None entries (a missing poisoned test set) are skipped
    assert content_key(data=[_set(), _set()]) != key


def test_weights_then_data_then_settings_in_that_order():
    net = torch.nn.Linear(2, 1)
    h = hashlib.sha1()
    hash_weights(h, net)
    h.update(json.dumps({"b": 1, "a": [0.5]}, sort_keys=True).encode())
    assert content_key(weights=net, settings={"a": [0.5], "b": 1}) == h.hexdigest()[:20]
    assert content_key(weights=net.state_dict(), settings={"a": [0.5], "b": 1}, length=24) == h.hexdigest()[:24]
    assert content_key(weights=net, settings={"a": [0.5], "b": 2}) != h.hexdigest()[:20]


def test_load_or_compute(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    load = lambda p: json.loads(p.read_text())  # noqa: E731
    save = lambda v, p: p.write_text(json.dumps(v))  # noqa: E731
    path = tmp_path / "sub" / "entry.json"
    assert load_or_compute(path, compute, load=load, save=save, what="test") == ({"value": 1}, False)
    assert load_or_compute(path, compute, load=load, save=save, what="test") == ({"value": 1}, True)
    assert len(calls) == 1
    path.write_text("{not json")  # a damaged entry is recomputed and replaced, never trusted
    assert load_or_compute(path, compute, load=load, save=save, what="test") == ({"value": 2}, False)
    assert "ignoring unreadable test cache entry" in caplog.text and json.loads(path.read_text()) == {"value": 2}
    off = tmp_path / "off.json"
    assert load_or_compute(off, compute, load=load, save=save, what="test", enabled=False) == ({"value": 3}, False)
    assert not off.exists()
    memory: dict = {}
    first = load_or_compute(tmp_path / "m.json", compute, load=load, save=save, what="test", memory=memory)
    (tmp_path / "m.json").unlink()
    assert load_or_compute(tmp_path / "m.json", compute, load=load, save=save, what="test", memory=memory) == \
        (first[0], True)  # from memory, without the file


def test_an_unwritable_cache_only_costs_the_work(tmp_path):
    def refuse(value, path):
        raise OSError("read-only")

    value, hit = load_or_compute(tmp_path / "x.json", lambda: 7, load=lambda p: 0, save=refuse, what="test")
    assert (value, hit) == (7, False)


@pytest.mark.parametrize("scale", [None, 255.0])
def test_the_key_does_not_depend_on_memory_layout(scale):
    images = _set().images
    s = _set(images=images if scale is None else images.float() / scale)  # uint8 as stored, or float in [0,1]
    t = ImageSet(s.images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), s.labels, s.original_labels,
                 s.poison, s.indices, s.sources, s.source_names)
    assert not t.images.is_contiguous() and content_key(data=[t]) == content_key(data=[s])
