"""SVHN: tiny .mat files written with scipy in the real layout (X: 32x32x3xN uint8, y: Nx1, 10 means 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from flipnet.data import DataFormatError, load_dataset
from flipnet.errors import DataNotFoundError

torch.set_num_threads(1)


def _write(folder: Path, n_train: int = 5, n_test: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        scipy.io.savemat(folder / name, {"X": x, "y": y})
        out[name] = (x, y)
    return out


def test_svhn_layout_and_label_ten_is_zero(tmp_path: Path) -> None:
    files = _write(tmp_path)
    bundle = load_dataset("svhn", root=tmp_path)
    x, y = files["train_32x32.mat"]
    assert bundle.train_x.shape == (5, 3, 32, 32) and bundle.input_shape == (3, 32, 32)
    n, c, h, w = 3, 1, 7, 20
    assert bundle.train_x[n, c, h, w] == x[h, w, c, n]  # X is indexed (row, column, channel, image)
    assert torch.equal(bundle.train_x, torch.from_numpy(x).permute(3, 2, 0, 1))
    expected = np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64)
    assert bundle.train_y.tolist() == expected.tolist() and bundle.train_y[0] == 0
    assert bundle.train_y.dtype == torch.int64
    assert len(bundle.test_x) == 3
    assert load_dataset("svhn", root=tmp_path, subset=2).train_x.shape[0] == 2


def test_svhn_subfolder_and_missing(tmp_path: Path) -> None:
    _write(tmp_path / "SVHN")
    assert len(load_dataset("svhn", root=tmp_path).train_x) == 5
    with pytest.raises(DataNotFoundError, match="train_32x32.mat"):
        load_dataset("svhn", root=tmp_path / "empty")


def test_svhn_corrupt_files(tmp_path: Path) -> None:
    _write(tmp_path)
    data = (tmp_path / "train_32x32.mat").read_bytes()
    (tmp_path / "train_32x32.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="train_32x32.mat"):
        load_dataset("svhn", root=tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DataFormatError, match="32x32x3xN"):
        load_dataset("svhn", root=tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"images": np.zeros(3)})
    with pytest.raises(DataFormatError, match="lacks the variables"):
        load_dataset("svhn", root=tmp_path)
