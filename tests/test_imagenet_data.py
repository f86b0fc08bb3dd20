"""The ImageFolder-layout ImageNet loader on a generated folder of tiny JPEGs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _imagenet_fixture import CLASSES, make_image_folder
from flipnet.data import dataset_shape, list_datasets, load_dataset
from flipnet.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageFolderData, eval_transform
from flipnet.errors import ConfigError, DataFormatError, DataNotFoundError


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


def _load(folder: Path, **kw) -> ImageFolderData:
    kw.setdefault("num_classes", 3)
    kw.setdefault("image_size", 16)
    kw.setdefault("num_workers", 0)
    return load_dataset("imagenet", root=folder, **kw)


def test_registered_with_shape_without_reading() -> None:
    assert "imagenet" in list_datasets()
    assert dataset_shape("imagenet") == ((3, 224, 224), 1000)
    assert dataset_shape("imagenet", image_size=32, num_classes=10) == ((3, 32, 32), 10)


def test_file_list_and_labels(folder: Path) -> None:
    data = _load(folder)
    assert data.classes == CLASSES and data.num_classes == 3 and data.task == "classification"
    assert len(data.train_files) == 18 and len(data.test_files) == 6
    assert data.train_y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert data.input_shape == (3, 16, 16)
    assert data.splits == ("train", "test")
    with pytest.raises(TypeError, match="streamed from disk"):
        data.split("train")
    # also found as root/imagenet
    assert _load(folder.parent, num_classes=3).root == folder if folder.name == "imagenet" else True


def test_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="ImageNet data not found .*looked in.*cannot download"):
        _load(tmp_path / "nowhere")


def test_wrong_class_count_and_empty_split(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="has 3 class folders but num_classes=1000; set data.options.num_classes=3"):
        load_dataset("imagenet", root=folder)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="holds no image files"):
        load_dataset("imagenet", root=tmp_path, num_classes=1)
    with pytest.raises(ConfigError, match="crop_scale"):
        _load(folder, crop_scale=(0.5, 0.1))
    for n in (0, "10", 2.5):  # a ConfigError (one sentence from the CLI), not a bare ValueError
        with pytest.raises(ConfigError, match="subset size must be a positive integer"):
            _load(folder, subset=n)
    for bad in ("abc", 0.5, ["a", "b"], [0.1, True], [0.1, 0.5, 1.0]):  # one sentence, not a raw TypeError/ValueError
        with pytest.raises(ConfigError, match="crop_scale must be two numbers"):
            _load(folder, crop_scale=bad)


def test_eval_batches_are_center_crops_normalised(folder: Path) -> None:
    data = _load(folder)
    loader = data.make_loader("test", 4, train=False, device="cpu")
    assert len(loader) == 2
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.cat([b[1] for b in batches]).tolist() == data.test_y.tolist()  # file order
    from PIL import Image

    with Image.open(data.test_files[0]) as img:
        ref = eval_transform(16)(img.convert("RGB"))
    torch.testing.assert_close(x[0], ref)
    # undo the normalisation: pixels are back in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = x * std + mean
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    assert torch.equal(list(loader)[0][0], x)  # evaluation is deterministic


def test_training_batches_are_seeded_and_worker_independent(folder: Path) -> None:
    a = _load(folder, num_workers=0).make_loader("train", 5, train=True, device="cpu", seed=3)
    data = _load(folder, num_workers=None)
    b = data.make_loader("train", 5, train=True, device="cpu", seed=3, num_workers=2)
    assert (a.num_workers, b.num_workers) == (0, 2)
    a.set_epoch(1), b.set_epoch(1)
    xa, ya = zip(*a)
    xb, yb = zip(*b)
    assert all(torch.equal(p, q) for p, q in zip(xa, xb)) and all(torch.equal(p, q) for p, q in zip(ya, yb))
    assert sorted(torch.cat(ya).tolist()) == sorted(data.train_y.tolist())  # every file once per epoch
    a.set_epoch(2)
    xc, _ = zip(*a)
    assert not torch.equal(torch.cat(xa), torch.cat(xc))  # a new epoch: new order and crops
    assert xa[0].shape == (5, 3, 16, 16)
    rng_before = torch.random.get_rng_state()
    list(a)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_ranks_shard_the_epoch(folder: Path) -> None:
    data = _load(folder)
    seen = []
    for rank in range(4):
        loader = data.make_loader("train", 3, train=True, device="cpu", seed=0, rank=rank, world_size=4)
        loader.set_epoch(0)
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == 5  # ceil(18 / 4); the tail wraps around
        seen.append(labels)
    counts = torch.bincount(torch.cat(seen), minlength=3)
    assert int(counts.sum()) == 20 and bool((counts >= 6).all())  # every file, plus 2 wrapped


def test_lone_last_training_batch_is_dropped(folder: Path) -> None:
    data = _load(folder, subset=7)
    loader = data.make_loader("train", 3, train=True, device="cpu")
    assert len(loader) == 2 and [len(y) for _, y in loader] == [3, 3]
    assert len(data.make_loader("train", 3, train=False, device="cpu")) == 3


def test_subset_and_validation_split(folder: Path) -> None:
    data = _load(folder, subset=12, test_subset=3)
    assert len(data.train_files) == 12 and len(data.test_files) == 3 and data.info["subset"] == {"train": 12, "test": 3}
    val = _load(folder).split_validation(6)
    assert val.splits == ("train", "val", "test")
    assert len(val.val_files) == 6 and len(val.train_files) == 12
    assert sorted(val.val_y.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
    assert not set(val.val_files) & set(val.train_files)
    assert val.val_files == _load(folder).split_validation(6).val_files  # deterministic
    assert _load(folder).split_validation(0).splits == ("train", "test")
    loader = val.make_loader("val", 4, train=False, device="cpu")
    assert sum(len(y) for _, y in loader) == 6


def test_corrupt_image_names_the_file(folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    bad = next((copy / "val" / CLASSES[1]).iterdir())
    bad.write_bytes(b"not a jpeg")
    data = _load(copy)
    with pytest.raises(DataFormatError, match="cannot decode image .*" + bad.name):
        list(data.make_loader("test", 8, train=False, device="cpu"))


def test_augmentation_lists(folder: Path) -> None:
    data = _load(folder)
    flip_only = data.make_loader("train", 6, train=True, device="cpu", augment=["flip"])
    names = [type(t).__name__ for t in flip_only._dataset.transform.transforms]
    assert names == ["Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    full = data.make_loader("train", 6, train=True, device="cpu", augment=True)
    assert type(full._dataset.transform.transforms[0]).__name__ == "RandomResizedCrop"
    with pytest.raises(ConfigError, match="'crop'.*'flip'"):
        data.make_loader("train", 6, train=True, device="cpu", augment=["rotate"])
    named = data.make_loader("train", 6, train=True, device="cpu", augment="flip")  # a name, not its letters
    assert [type(t).__name__ for t in named._dataset.transform.transforms] == names
    both = data.make_loader("train", 6, train=True, device="cpu", augment="crop, flip")
    assert type(both._dataset.transform.transforms[0]).__name__ == "RandomResizedCrop"


def test_corrupt_image_in_a_worker_is_one_sentence(folder: Path, tmp_path: Path) -> None:
    # DataLoader re-raises a worker's error with the worker's traceback as its message
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    bad = sorted((copy / "train" / CLASSES[2]).iterdir())[1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    loader = _load(copy, num_workers=1).make_loader("train", 4, train=True, device="cpu", seed=0)
    assert loader.num_workers == 1
    with pytest.raises(DataFormatError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "Caught" not in message
    assert message.startswith("cannot decode image ") and bad.name in message


def test_empty_class_folder_is_named(folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    for f in (copy / "train" / CLASSES[1]).iterdir():
        f.unlink()
    (copy / "train" / CLASSES[1] / "notes.txt").write_text("not an image")
    with pytest.raises(DataFormatError, match=f"class folder\\(s\\) without image files: '{CLASSES[1]}'"):
        _load(copy)


def test_non_image_and_hidden_files_are_not_listed(folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "train" / CLASSES[0] / "README.txt").write_text("hello")
    (copy / "train" / CLASSES[0] / "._n01440764_0000.JPEG").write_bytes(b"\x00\x05\x16\x07 resource fork")
    data = _load(copy)
    assert len(data.train_files) == 18
    assert not any(Path(f).name.startswith(".") or f.endswith(".txt") for f in data.train_files)
    assert sum(len(y) for _, y in data.make_loader("train", 5, train=True, device="cpu")) == 18


def test_subset_covers_every_class(folder: Path) -> None:
    # the files are sorted class by class: a plain "first N" would hold class 0 only
    data = _load(folder, subset=3, test_subset=4)
    assert sorted(data.train_y.tolist()) == [0, 1, 2]
    assert sorted(data.test_y.tolist()) == [0, 0, 1, 2]
    full = _load(folder)
    assert data.train_files == tuple(full.train_files[i] for i in (0, 6, 12))  # first file of each class
    assert data.test_files == tuple(full.test_files[i] for i in (0, 1, 2, 4))  # file order kept
    assert _load(folder, subset=100).train_files == full.train_files
