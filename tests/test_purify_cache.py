"""The opt-in cache of purified models (``BBGIC_PURIFY_CACHE=1``): off by default, keyed by what a purification
computes (the victim, the auxiliary set, the settings that change results, the seed), served back exactly."""
import pytest
import torch

from backdoorbench_gic.defenses import purify_cache
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.registry import DEFENSES

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
FT = dict(epochs=1, batch_size=10, lr=0.01)


@pytest.fixture(scope="module")
def victim_and_aux(bb_record):
    _, record_dir = bb_record
    record = load_attack_record(record_dir)
    return record.build_model().eval(), record.clean_train.subset(torch.arange(20))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "gic"))
    return tmp_path / "purified"


def ft(**overrides):
    return DEFENSES.get("ft")(**{**FT, **overrides})


def test_off_by_default(victim_and_aux, cache, monkeypatch):
    monkeypatch.delenv(purify_cache.ENV, raising=False)
    victim, aux = victim_and_aux
    purify_cache.purify(ft(), victim, aux, device=CPU, progress=False)
    assert not cache.exists()


def test_a_second_identical_purification_is_served_from_the_cache(victim_and_aux, cache, monkeypatch):
    monkeypatch.setenv(purify_cache.ENV, "1")
    victim, aux = victim_and_aux
    first = purify_cache.purify(ft(), victim, aux, device=CPU, progress=False)
    assert len(list(cache.glob("*.pt"))) == 1
    # settings that change where or how fast a run goes share the entry; the defense is not run again
    again = ft(device="cpu", num_workers=2, pin_memory=False, log="elsewhere.log")

    def refuse(*args, **kwargs):
        raise AssertionError("purified again instead of served from the cache")

    again.purify = refuse
    second = purify_cache.purify(again, victim, aux, device=CPU, progress=False)
    for (k, a), (_, b) in zip(first.model.net.state_dict().items(), second.model.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert second.history == first.history and second.model is not first.model
    # a setting that changes the result, or another seed, is another entry
    purify_cache.purify(ft(random_seed=1), victim, aux, device=CPU, progress=False)
    purify_cache.purify(ft(lr=0.02), victim, aux, device=CPU, progress=False)
    assert len(list(cache.glob("*.pt"))) == 3


def test_the_key_follows_the_results_settings_the_data_and_the_weights(victim_and_aux):
    victim, aux = victim_and_aux
    key = purify_cache.purify_key(ft(), victim, aux, None)
    assert purify_cache.purify_key(ft(device="cpu", num_workers=3, yaml_path="x.yaml"), victim, aux, None) == key
    assert purify_cache.purify_key(ft(random_seed=2), victim, aux, None) != key
    assert purify_cache.purify_key(ft(), victim, aux.subset(torch.arange(19)), None) != key
    other = aux.with_labels((aux.labels + 1) % 10)
    assert purify_cache.purify_key(ft(), victim, other, None) != key
    changed = victim_and_aux[0].__class__(victim.net, victim.mean.flatten().tolist(), victim.std.flatten().tolist())
    assert purify_cache.purify_key(ft(), changed, aux, None) == key  # the weights, not the object, enter the key


def test_a_wrapper_is_not_cached_itself(cache, monkeypatch):
    monkeypatch.setenv(purify_cache.ENV, "1")
    gic = DEFENSES.get("gic")(base="ft")
    assert gic.cacheable is False and DEFENSES.get("ft").cacheable is True
