"""Validation split, per-data-set augmentation policies and the lone last training batch (issue #10)."""

from __future__ import annotations

import pytest
import torch

from flipnet.data import (
    DatasetBundle,
    GpuLoader,
    load_dataset,
    make_loader,
    resolve_augment,
    resolve_val_size,
    split_validation,
)
from flipnet.errors import ConfigError

torch.set_num_threads(1)


def _bundle(n: int = 100, classes: int = 4, name: str = "toy") -> DatasetBundle:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    return DatasetBundle(name, x, y, x[:10], y[:10], num_classes=classes)


# ------------------------------------------------------------------ validation split


def test_split_is_disjoint_complete_stratified_and_deterministic() -> None:
    b = _bundle(100, 4)
    s = split_validation(b, 20)
    assert s.splits == ("train", "val", "test")
    assert len(s.val_x) == 20 and len(s.train_x) == 80
    assert torch.bincount(s.val_y).tolist() == [5, 5, 5, 5]  # stratified
    # disjoint and complete: every original image is in exactly one part (rows are unique here)
    rows = lambda t: {bytes(r.flatten().tolist()) for r in t}  # noqa: E731
    assert rows(s.train_x) | rows(s.val_x) == rows(b.train_x) and not rows(s.train_x) & rows(s.val_x)
    again = split_validation(b, 20)
    assert torch.equal(again.val_x, s.val_x) and torch.equal(again.train_y, s.train_y)
    other = split_validation(b, 20, seed=5)
    assert not torch.equal(other.val_x, s.val_x)
    x, y = s.split("val")
    assert x is s.val_x and y is s.val_y
    assert s.info["val_split"] == {"size": 20, "of": 100, "seed": 0, "stratified": True}


def test_uneven_classes_get_largest_remainder_counts() -> None:
    b = _bundle(10, 3)  # classes 0,1,2 with 4,3,3 examples
    s = split_validation(b, 0.5)
    assert len(s.val_y) == 5
    assert sorted(torch.bincount(s.val_y, minlength=3).tolist()) == [1, 2, 2]


@pytest.mark.parametrize(
    ("size", "n", "want"),
    [(None, 100, 0), (0, 100, 0), (0.0, 100, 0), (0.1, 1437, 144), (0.001, 100, 1), (7, 100, 7)],
)
def test_resolve_val_size(size, n, want) -> None:
    assert resolve_val_size(size, n) == want


def test_auto_uses_the_data_sets_default() -> None:
    assert resolve_val_size("auto", 50_000, "cifar10") == 5_000
    assert resolve_val_size("auto", 73_257, "svhn") == 7_326
    assert resolve_val_size("auto", 1_437, "digits") == 144
    assert resolve_val_size("auto", 60_000, "mnist") == 0
    assert resolve_val_size("auto", 10, "digits") == 0  # too small to split
    assert resolve_val_size("auto", 100, "no_such_set") == 0


@pytest.mark.parametrize(("size", "piece"), [(100, "leaves none to train on"), (1.0, "in \\(0, 1\\)"),
                                             ("half", "val_size must be"), (-1, "0 or more")])
def test_bad_val_sizes(size, piece) -> None:
    with pytest.raises(ConfigError, match=piece):
        resolve_val_size(size, 100)


def test_no_val_split_says_how_to_get_one() -> None:
    with pytest.raises(ValueError, match="no validation split; set data.val_size"):
        _bundle().split("val")
    with pytest.raises(ConfigError, match="already has a validation split"):
        split_validation(split_validation(_bundle(), 10), 10)


def test_digits_validation_split_and_loader() -> None:
    b = load_dataset("digits", val_size="auto")
    assert (len(b.train_x), len(b.val_x), len(b.test_x)) == (1293, 144, 360)
    loader = make_loader(b, "val", 100, train=False, device="cpu")
    assert sum(len(y) for _, y in loader) == 144


def test_segmentation_split_is_random() -> None:
    x = torch.zeros(30, 1, 4, 4, dtype=torch.uint8)
    m = torch.zeros(30, 4, 4, dtype=torch.int64)
    b = DatasetBundle("seg", x, m, x[:2], m[:2], num_classes=2, task="segmentation")
    s = split_validation(b, 0.2)
    assert len(s.val_x) == 6 and s.val_y.shape == (6, 4, 4) and s.info["val_split"]["stratified"] is False


# ------------------------------------------------------------------ augmentation policies


def test_each_data_set_declares_its_augmentations() -> None:
    assert resolve_augment("cifar10", True) == (("crop", "flip"), 4)
    assert resolve_augment("svhn", True) == (("crop",), 4)
    assert resolve_augment("digits", ["crop"]) == (("crop",), 1)
    assert resolve_augment("mnist", True) == (("crop",), 2)
    assert resolve_augment("cifar10", ["flip"]) == (("flip",), 4)
    assert resolve_augment("digits", False) == ((), 1)


@pytest.mark.parametrize("name", ["digits", "svhn", "mnist"])
def test_flipping_digits_is_refused_with_a_reason(name: str) -> None:
    with pytest.raises(ConfigError, match=f"data set '{name}' does not allow the 'flip' augmentation: a mirrored digit"):
        resolve_augment(name, ["crop", "flip"])


def test_digits_refuse_augment_true_with_the_measured_reason() -> None:
    with pytest.raises(ConfigError, match=r"data set 'digits' has no default augmentation: a 1-pixel shift .*98.3% -> 87.5%"):
        resolve_augment("digits", True)


def test_digits_crop_shifts_by_at_most_one_pixel_and_never_flips() -> None:
    b = load_dataset("digits", subset=64)
    plain = make_loader(b, "train", 64, train=True, device="cpu", augment=False, seed=3)
    aug = make_loader(b, "train", 64, train=True, device="cpu", augment=["crop"], seed=3)
    assert aug.pad == 1 and aug.flip is False
    plan = aug.plan(0)
    assert int(plan.ox.max()) <= 2 and int(plan.oy.max()) <= 2 and not plan.flip.any()
    (xp, _), (xa, _) = next(iter(plain)), next(iter(aug))
    assert not torch.equal(xp, xa)  # something moved


def test_svhn_like_bundle_crops_without_flips() -> None:
    b = _bundle(64, name="svhn")
    loader = make_loader(b, "train", 64, train=True, device="cpu", augment=True, seed=0)
    assert loader.pad == 4 and not loader.plan(0).flip.any()
    with pytest.raises(ConfigError, match="does not allow the 'flip'"):
        make_loader(b, "train", 64, train=True, device="cpu", augment=["flip"])


def test_evaluation_loaders_never_augment() -> None:
    b = _bundle(64, name="cifar10")
    loader = make_loader(b, "test", 8, train=False, device="cpu", augment=True)
    assert loader.augment is False


# ------------------------------------------------------------------ a last batch of one


def test_training_loader_leaves_out_a_lone_last_sample() -> None:
    b = _bundle(9)
    train = make_loader(b, "train", 4, train=True, device="cpu")
    sizes = [len(y) for _, y in train]
    assert sizes == [4, 4] and train.drops_lone_sample
    evaluation = make_loader(b, "train", 4, train=False, device="cpu")
    assert [len(y) for _, y in evaluation] == [4, 4, 1]
    assert [len(y) for _, y in make_loader(_bundle(10), "train", 4, train=True, device="cpu")] == [4, 4, 2]


def test_the_left_out_sample_changes_between_epochs() -> None:
    x = torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1).expand(9, 1, 2, 2).contiguous()
    loader = GpuLoader(x, torch.arange(9), 4, device="cpu", drop_lone_last=True, seed=0)
    missing = set()
    for _ in range(8):
        seen = {int(v) for _, y in loader for v in y}
        assert len(seen) == 8
        missing |= set(range(9)) - seen
    assert len(missing) > 1


def test_one_sample_per_rank_is_a_clear_error() -> None:
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="BatchNorm cannot train on a batch of one"):
        GpuLoader(x, torch.zeros(1, dtype=torch.int64), 4, device="cpu", drop_lone_last=True)


def test_host_and_device_loaders_agree_on_lone_samples_and_crop_only() -> None:
    b = _bundle(41, name="svhn")  # 41 = 5 * 8 + 1; svhn: crop without flip
    kw = dict(train=True, device="cpu", augment=True, seed=4)
    gpu = make_loader(b, "train", 8, resident=True, **kw)
    host = make_loader(b, "train", 8, resident=False, **kw)
    assert type(gpu).__name__ == "GpuLoader" and type(host).__name__ == "HostLoader"
    assert len(gpu) == len(host) == 5 and gpu.drops_lone_sample and host.drops_lone_sample
    for (xg, yg), (xh, yh) in zip(gpu, host):
        assert torch.equal(xg, xh) and torch.equal(yg, yh)


# ------------------------------------------------------------------ end to end: what the trainer reads


def _rows(x: torch.Tensor) -> list[bytes]:
    return [bytes(r.flatten().tolist()) for r in x]


@pytest.mark.parametrize("seeds", [None, "0,1"], ids=["one-seed", "two-seeds"])
def test_the_trainer_never_trains_on_validation_or_test_images(tmp_path, seeds) -> None:
    """Through the recipe path (data.subset, then data.val_size), for one seed and for a vectorised
    multi-seed run: every training batch of every member comes from the cut training set minus the
    validation split, and the evaluation loaders read exactly the validation and test splits."""
    from flipnet.train.config import load_config
    from flipnet.train.loop import Trainer

    overrides = ["data.name=synthetic", "data.options={num_train: 300, num_test: 40}", "data.subset=200",
                 "data.val_size=0.25", "data.batch_size=32", "model.kwargs.hidden_sizes=[8]", "train.epochs=1",
                 "train.device=cpu", "train.progress=false", "train.plots=false", "train.tensorboard=false",
                 f"output.dir={tmp_path}"]
    if seeds:
        overrides.append(f"seeds={seeds}")
    trainer = Trainer.from_config(load_config("digits_bop", overrides))
    full = load_dataset("synthetic", num_train=300, num_test=40)
    cut = set(_rows(full.train_x[:200]))
    assert len(cut) == 200  # every synthetic image is unique, so rows identify examples
    val = _rows(trainer.data.val_x)
    assert len(val) == 50 and set(val) <= cut  # the split is taken after data.subset
    assert len(trainer.train_loaders) == (2 if seeds else 1)
    for loader in trainer.train_loaders:
        seen: set[bytes] = set()
        for epoch in range(3):
            loader.set_epoch(epoch)
            for x, _ in loader:
                seen |= set(_rows(((x + 1) * 127.5).round().to(torch.uint8)))
        assert not seen & set(val), "a validation image was trained on"
        assert seen == cut - set(val)  # the 150 remaining images, no others
    read = lambda loader: [r for x, _ in loader for r in _rows(((x + 1) * 127.5).round().to(torch.uint8))]  # noqa: E731
    assert read(trainer.val_loader) == val
    assert read(trainer.test_loader) == _rows(full.test_x)  # the test set is untouched


def test_the_docs_augmentation_table_matches_the_registry() -> None:
    """docs/data.md's table of allowed/default augmentations and pads is what the data sets declare."""
    import re
    from pathlib import Path

    from flipnet.data import list_datasets
    from flipnet.data.base import augment_policy

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    section = text.split("## Augmentation: what each data set allows", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        names_cell, allowed, default, pad = [c.strip() for c in row.strip("|").split("|")][:4]
        for name in re.findall(r"`([a-z0-9_]+)`", names_cell):
            documented[name] = (allowed, default, pad)
    in_memory = [n for n in list_datasets() if n != "imagenet" and not n.startswith("_")]  # ImageNet has its own pipeline (its section)
    assert sorted(documented) == sorted(in_memory)
    for name, (allowed, default, pad) in documented.items():
        policy = augment_policy(name)
        assert tuple(a.strip() for a in allowed.split(",")) == policy.allowed, name
        want_default = () if default.startswith("refused") else tuple(a.strip() for a in default.split("+"))
        assert want_default == policy.default, name
        assert int(pad) == policy.pad, name
