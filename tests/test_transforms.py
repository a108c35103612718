import torch
import torch.nn.functional as F

from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.data.transforms import TrainAugment


def test_crop_is_a_window_of_the_zero_padded_image():
    x = torch.rand(16, 3, 8, 8)
    out = TrainAugment(padding=2)(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, f"sample {i} is not a crop of its padded image"


def test_flip_and_determinism():
    x = torch.rand(32, 1, 6, 6)
    aug = TrainAugment(padding=0, hflip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(a[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_no_padding_no_flip_is_identity():
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(TrainAugment(0, False)(x), x)


def test_imageset_batches_cover_every_sample_once_in_seeded_order():
    s = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).repeat(1, 1, 2, 2), list(range(10)))
    seen = [int(v) for b in s.batches(3, shuffle=True, generator=torch.Generator().manual_seed(5)) for v in b.index]
    again = [int(v) for b in s.batches(3, shuffle=True, generator=torch.Generator().manual_seed(5)) for v in b.index]
    assert sorted(seen) == list(range(10)) and seen == again
    first = next(iter(s.batches(4)))
    assert first.x.dtype == torch.float32 and torch.allclose(first.x[:, 0, 0, 0], torch.arange(4) / 255.0)


def test_concat_keeps_provenance():
    a = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0, 1], source_names=["reserved"])
    b = ImageSet(torch.ones(3, 1, 2, 2), [1, 1, 0], source_names=["synthetic"])
    c = ImageSet.concat([a, b])
    assert c.source_names == ["reserved", "synthetic"] and c.sources.tolist() == [0, 0, 1, 1, 1]
    assert not c.is_uint8 and c.positions_of_source("synthetic").tolist() == [2, 3, 4]
