"""GpuLoader / HostLoader / make_loader: shapes, scaling, determinism, augmentation, sharding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flipnet.data import DatasetBundle, GpuLoader, HostLoader, augment_batch, load_dataset, make_loader, scale_images

torch.set_num_threads(1)


def _images(n: int = 37, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _ids_loader(n: int, **kw) -> GpuLoader:
    """A loader whose images encode their own index (pixel value = index), to trace what was read."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n, dtype=torch.int64)
    return GpuLoader(x, y, device="cpu", **kw)


def _epoch_labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_scale_images_maps_uint8_to_minus_one_one() -> None:
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    out = scale_images(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() / 127.5 - 1.0)
    assert out[0] == -1.0 and out[-1] == 1.0


def test_batches_shapes_range_and_len() -> None:
    x, y = _images(37), torch.arange(37) % 5
    loader = GpuLoader(x, y, 8, shuffle=True, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert [len(b[0]) for b in batches] == [8, 8, 8, 8, 5]
    for xb, yb in batches:
        assert xb.shape[1:] == (3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.min() >= -1.0 and xb.max() <= 1.0
    assert sorted(_epoch_labels(_ids_loader(37, batch_size=8))) == list(range(37))
    assert len(GpuLoader(x, y, 8, drop_last=True, device="cpu")) == 4


def test_unshuffled_order_and_exact_values() -> None:
    x, y = _images(10), torch.arange(10)
    xb, yb = next(iter(GpuLoader(x, y, 4, shuffle=False, device="cpu")))
    torch.testing.assert_close(xb, x[:4].float() / 127.5 - 1.0)
    assert yb.tolist() == [0, 1, 2, 3]


def test_deterministic_given_seed_and_epoch() -> None:
    a, b = _ids_loader(50, batch_size=7, seed=3), _ids_loader(50, batch_size=7, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _epoch_labels(a) == _epoch_labels(b)
    a.set_epoch(2)
    first = _epoch_labels(a)
    assert _epoch_labels(a) != first  # no set_epoch: the next pass is epoch 3, a new order
    a.set_epoch(2)
    assert _epoch_labels(a) == first
    assert _epoch_labels(_ids_loader(50, batch_size=7, seed=4)) != _epoch_labels(_ids_loader(50, batch_size=7, seed=3))


def test_augmented_batches_are_deterministic() -> None:
    x, y = _images(20), torch.arange(20)
    runs = []
    for _ in range(2):
        loader = GpuLoader(x, y, 6, augment=True, device="cpu", seed=11)
        loader.set_epoch(5)
        runs.append([xb for xb, _ in loader])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def _reference_crop(img: torch.Tensor, ox: int, oy: int, flip: bool, pad: int, fill: int = 0) -> torch.Tensor:
    """Crop one image (C, H, W) or mask (H, W) the slow, obvious way."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad, pad, pad, pad), value=fill)
    out = padded[..., oy : oy + h, ox : ox + w]
    return out.flip(-1) if flip else out


def test_augment_batch_matches_reference_crop_and_flip() -> None:
    x = _images(6, c=3, h=7, w=9)
    y = torch.arange(6)
    ox = torch.tensor([0, 8, 4, 3, 0, 8])
    oy = torch.tensor([0, 8, 4, 1, 8, 0])
    flip = torch.tensor([False, True, False, True, True, False])
    out, yy = augment_batch(x, y, ox, oy, flip, pad=4)
    assert torch.equal(yy, y)
    for i in range(6):
        assert torch.equal(out[i], _reference_crop(x[i], int(ox[i]), int(oy[i]), bool(flip[i]), 4))
    # offset (pad, pad) without flip is the identity
    same, _ = augment_batch(x, y, torch.full((6,), 4), torch.full((6,), 4), torch.zeros(6, dtype=torch.bool), pad=4)
    assert torch.equal(same, x)


def test_loader_augmentation_really_crops_and_flips() -> None:
    x, y = _images(64, c=3, h=8, w=8), torch.arange(64)
    loader = GpuLoader(x, y, 64, shuffle=False, augment=True, device="cpu", seed=0, pad=2)
    plan = loader.plan(0)
    xb, _ = next(iter(loader))
    for i in range(64):
        ref = _reference_crop(x[i], int(plan.ox[i]), int(plan.oy[i]), bool(plan.flip[i]), 2)
        torch.testing.assert_close(xb[i], ref.float() / 127.5 - 1.0)
    assert plan.flip.any() and not plan.flip.all()
    assert set(plan.ox.tolist()) == {0, 1, 2, 3, 4} and set(plan.oy.tolist()) == {0, 1, 2, 3, 4}
    assert (xb != scale_images(x)).any(dim=(1, 2, 3)).float().mean() > 0.5


def test_segmentation_mask_is_cropped_and_flipped_like_the_image() -> None:
    bundle = load_dataset("synthetic", task="segmentation", shape=(2, 10, 12), num_classes=3, num_train=16, num_test=4)
    loader = GpuLoader(bundle.train_x, bundle.train_y, 16, shuffle=False, augment=True, device="cpu", seed=1)
    plan = loader.plan(0)
    xb, yb = next(iter(loader))
    assert yb.shape == (16, 10, 12) and yb.dtype == torch.int64
    for i in range(16):
        args = (int(plan.ox[i]), int(plan.oy[i]), bool(plan.flip[i]), 4)
        assert torch.equal(yb[i], _reference_crop(bundle.train_y[i], *args, fill=-100))
        torch.testing.assert_close(xb[i], scale_images(_reference_crop(bundle.train_x[i], *args)))
    assert (yb == -100).any()  # padded border is marked as ignore_index


@pytest.mark.parametrize("n,world_size,batch_size", [(40, 4, 3), (41, 4, 5), (7, 3, 2), (2, 3, 1)])
def test_sharding_covers_the_epoch_without_overlap(n: int, world_size: int, batch_size: int) -> None:
    shards = [_epoch_labels(_ids_loader(n, batch_size=batch_size, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    lens = {len(_ids_loader(n, batch_size=batch_size, rank=r, world_size=world_size)) for r in range(world_size)}
    assert len(lens) == 1  # every rank runs the same number of batches
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for i in s]
    assert set(seen) == set(range(n))  # everything covered
    per_rank = -(-n // world_size)
    assert len(seen) == per_rank * world_size  # padding only to the next multiple of world_size
    repeats = len(seen) - n
    assert repeats == (0 if n % world_size == 0 else world_size - n % world_size)


def test_sharding_drop_last_has_no_repeats() -> None:
    shards = [_epoch_labels(_ids_loader(41, batch_size=2, rank=r, world_size=4, drop_last=True)) for r in range(4)]
    seen = [i for s in shards for i in s]
    assert len(seen) == len(set(seen)) == 40


def test_ranks_agree_on_the_epoch_permutation() -> None:
    # the union over ranks of epoch e is one permutation, so a different epoch gives a different split
    shard0_e0 = _epoch_labels(_ids_loader(32, batch_size=4, rank=0, world_size=2, seed=9))
    loader = _ids_loader(32, batch_size=4, rank=0, world_size=2, seed=9)
    loader.set_epoch(1)
    assert _epoch_labels(loader) != shard0_e0


def test_host_loader_yields_the_same_batches_as_gpu_loader() -> None:
    x, y = _images(30), torch.arange(30) % 4
    kw = dict(shuffle=True, augment=True, device="cpu", seed=2, rank=1, world_size=2)
    gpu, host = GpuLoader(x, y, 4, **kw), HostLoader(x, y, 4, **kw)
    for epoch in (0, 1):
        gpu.set_epoch(epoch)
        host.set_epoch(epoch)
        pairs = list(zip(gpu, host, strict=True))
        assert len(pairs) == len(gpu) == len(host)
        for (a, b), (c, d) in pairs:
            assert torch.equal(a, c) and torch.equal(b, d)


def test_host_loader_with_worker_processes() -> None:
    x, y = _images(12), torch.arange(12)
    host = HostLoader(x, y, 5, shuffle=False, device="cpu", num_workers=1)
    out = list(host)
    assert [len(b[1]) for b in out] == [5, 5, 2]
    torch.testing.assert_close(torch.cat([b[0] for b in out]), scale_images(x))


def test_make_loader_train_and_eval_semantics() -> None:
    bundle = load_dataset("synthetic", num_train=50, num_test=20, shape=(3, 8, 8), num_classes=4)
    train = make_loader(bundle, "train", 16, train=True, device="cpu", augment=True, seed=0)
    test = make_loader(bundle, "test", 16, train=False, device="cpu", augment=True, seed=0)
    assert isinstance(train, GpuLoader) and train.shuffle and train.augment
    assert isinstance(test, GpuLoader) and not test.shuffle and not test.augment  # never augment evaluation
    xs = torch.cat([xb for xb, _ in test])
    torch.testing.assert_close(xs, scale_images(bundle.test_x))
    host = make_loader(bundle, "train", 16, train=True, device="cpu", augment=True, seed=0, resident=False)
    assert isinstance(host, HostLoader)
    for (a, b), (c, d) in zip(train, host, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    cl = make_loader(bundle, "test", 8, train=False, device="cpu", augment=False, seed=0, channels_last=True)
    assert next(iter(cl))[0].is_contiguous(memory_format=torch.channels_last)


def test_loader_rejects_bad_arguments() -> None:
    x, y = _images(10), torch.arange(10)
    with pytest.raises(ValueError, match="uint8"):
        GpuLoader(x.float(), y, 4, device="cpu")
    with pytest.raises(ValueError, match="labels"):
        GpuLoader(x, y[:5], 4, device="cpu")
    with pytest.raises(ValueError, match="rank"):
        GpuLoader(x, y, 4, device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        GpuLoader(x, y, 0, device="cpu")
    with pytest.raises(ValueError, match="no full batch"):
        GpuLoader(x, y, 8, device="cpu", drop_last=True, world_size=2)
    bundle = DatasetBundle("t", x, y, x, y, num_classes=10)
    with pytest.raises(ValueError, match="split"):
        make_loader(bundle, "val", 4, train=False, device="cpu")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    world_size=st.integers(1, 5),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
def test_sharding_invariants(n: int, world_size: int, batch_size: int, drop_last: bool, shuffle: bool, seed: int) -> None:
    try:
        loaders = [
            _ids_loader(n, batch_size=batch_size, rank=r, world_size=world_size, drop_last=drop_last, shuffle=shuffle, seed=seed)
            for r in range(world_size)
        ]
    except ValueError:
        assert drop_last and (n // world_size) // batch_size == 0  # only "no full batch" may refuse
        return
    shards = [_epoch_labels(loader) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    assert all(len(batch[1]) <= batch_size for batch in loaders[0])
    seen = [i for s in shards for i in s]
    if drop_last:
        assert len(seen) == len(set(seen))  # no sample twice
        assert all(len(s) % batch_size == 0 for s in shards)
    else:
        assert set(seen) == set(range(n))  # every sample at least once
        assert len(seen) - n < world_size  # padding repeats fewer than world_size samples


def test_wrapped_repeats_come_last_in_each_rank() -> None:
    n, ws = 10, 4  # 12 slots: two samples repeat
    seen: list[int] = []
    for r in range(ws):
        share = -(-(n - r) // ws)
        labels = _epoch_labels(_ids_loader(n, batch_size=2, shuffle=False, rank=r, world_size=ws))
        seen += labels[:share]
    assert sorted(seen) == list(range(n))
