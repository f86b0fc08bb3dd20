"""Oxford-IIIT Pet: a few tiny generated files in torchvision's layout, trimaps → masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipnet.data import DataFormatError, load_dataset
from flipnet.errors import ConfigError, DataNotFoundError

torch.set_num_threads(1)

# image id, breed (1-based class id), species, size (w, h), colour
TRAIN = [("Abyssinian_1", 1, 1, (40, 30), (200, 30, 30)), ("american_bulldog_7", 2, 2, (31, 47), (20, 180, 40))]
TEST = [("Abyssinian_2", 1, 1, (25, 25), (10, 20, 220))]


def _make_pets(root: Path, grayscale_first: bool = False) -> Path:
    folder = root / "oxford-iiit-pet"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations" / "trimaps").mkdir(parents=True)
    for split, entries in (("trainval", TRAIN), ("test", TEST)):
        lines = [f"{image_id} {breed} {species} {breed}" for image_id, breed, species, _, _ in entries]
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for i, (image_id, _, _, (w, h), colour) in enumerate(entries):
            img = Image.new("RGB", (w, h), colour)
            if grayscale_first and i == 0:
                img = img.convert("L")  # a few real images are grayscale
            img.save(folder / "images" / f"{image_id}.jpg", quality=95)
            trimap = np.full((h, w), 2, np.uint8)  # background
            trimap[:, : w // 2] = 1  # left half: pet
            trimap[:, w // 2] = 3  # a border column
            Image.fromarray(trimap, mode="L").save(folder / "annotations" / "trimaps" / f"{image_id}.png")
    return folder


def test_segmentation_masks_and_resizing(tmp_path: Path) -> None:
    _make_pets(tmp_path)
    bundle = load_dataset("oxford_pets", root=tmp_path, image_size=(12, 16), cache=False)
    assert bundle.task == "segmentation" and bundle.num_classes == 3
    assert bundle.class_names == ("pet", "background", "border")
    assert bundle.train_x.shape == (2, 3, 12, 16) and bundle.train_y.shape == (2, 12, 16)
    assert bundle.test_x.shape == (1, 3, 12, 16) and bundle.train_y.dtype == torch.int64
    for mask in (*bundle.train_y, *bundle.test_y):
        assert set(mask.unique().tolist()) <= {0, 1, 2}
        assert (mask[:, :6] == 0).all()  # trimap 1 (pet) → 0
        assert (mask[:, -6:] == 1).all()  # trimap 2 (background) → 1
    colour = torch.tensor(TRAIN[0][4], dtype=torch.float32).view(3, 1, 1)
    assert (bundle.train_x[0].float() - colour).abs().max() <= 6  # a solid colour stays that colour


def test_border_class_survives_nearest_resize(tmp_path: Path) -> None:
    _make_pets(tmp_path)
    bundle = load_dataset("oxford_pets", root=tmp_path, image_size=(30, 40), cache=False, subset=1)
    assert (bundle.train_y[0] == 2).any()  # same size as the 40x30 trimap: nothing is lost
    assert len(bundle.train_x) == 1


def test_grayscale_images_become_rgb(tmp_path: Path) -> None:
    _make_pets(tmp_path, grayscale_first=True)
    bundle = load_dataset("oxford_pets", root=tmp_path, image_size=8, cache=False)
    x = bundle.train_x[0].float()
    assert x.shape == (3, 8, 8) and (x[0] - x[1]).abs().max() <= 1 and (x[1] - x[2]).abs().max() <= 1


def test_classification_task(tmp_path: Path) -> None:
    _make_pets(tmp_path)
    bundle = load_dataset("oxford_pets", root=tmp_path / "oxford-iiit-pet", task="classification", image_size=8, cache=False)
    assert bundle.task == "classification" and bundle.train_y.tolist() == [0, 1] and bundle.test_y.tolist() == [0]
    assert bundle.class_names == ("Abyssinian", "American Bulldog")


def test_cache_is_written_reused_and_invalidated(tmp_path: Path) -> None:
    folder = _make_pets(tmp_path)
    first = load_dataset("oxford_pets", root=tmp_path, image_size=8)
    caches = list((folder / "flipnet-cache").glob("*.pt"))
    assert len(caches) == 1 and first.info["cache"] == str(caches[0])
    for p in (folder / "images").glob("*.jpg"):
        p.unlink()
    again = load_dataset("oxford_pets", root=tmp_path, image_size=8)  # images gone: only the cache can answer
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    (folder / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\n")  # the split changed
    with pytest.raises(DataNotFoundError, match="Abyssinian_1.jpg"):
        load_dataset("oxford_pets", root=tmp_path, image_size=8)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="oxford-iiit-pet"):
        load_dataset("oxford_pets", root=tmp_path)
    folder = _make_pets(tmp_path)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("oxford_pets", root=tmp_path, image_size=(8,))
    bad = np.full((25, 25), 7, np.uint8)
    Image.fromarray(bad, mode="L").save(folder / "annotations" / "trimaps" / "Abyssinian_2.png")
    with pytest.raises(DataFormatError, match=r"trimap values must be 1, 2 or 3, found \[7\]"):
        load_dataset("oxford_pets", root=tmp_path, image_size=8, cache=False)
    (folder / "images" / "Abyssinian_1.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataFormatError, match="Abyssinian_1.jpg"):
        load_dataset("oxford_pets", root=tmp_path, image_size=8, cache=False)
    (folder / "annotations" / "trainval.txt").write_text("Abyssinian_1 cat\n")
    with pytest.raises(DataFormatError, match="trainval.txt:1"):
        load_dataset("oxford_pets", root=tmp_path, image_size=8, cache=False)
