"""MNIST / Fashion-MNIST: IDX reader on tiny files in the real format and the folder layouts."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from flipnet.data import DataFormatError, load_dataset
from flipnet.data.mnist import FASHION_MNIST_CLASSES, read_idx, write_idx
from flipnet.errors import DataNotFoundError

torch.set_num_threads(1)

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_set(folder: Path, compress: bool, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        STEMS[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        STEMS[1]: rng.integers(0, 10, n_train).astype(np.uint8),
        STEMS[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        STEMS[3]: rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), arr, compress=compress)
    return arrays


def test_idx_header_is_the_real_format(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    raw = (tmp_path / "a").read_bytes()
    # magic 0x00000803 (uint8, 3 dims), then big-endian int32 dims, then the bytes
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == arr.tobytes()
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_idx_reads_other_element_types(tmp_path: Path) -> None:
    data = np.array([1, -2, 300], dtype=">i4")
    (tmp_path / "i").write_bytes(bytes([0, 0, 0x0C, 1]) + np.array([3], ">u4").tobytes() + data.tobytes())
    assert read_idx(tmp_path / "i").tolist() == [1, -2, 300]


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_torchvision_layout(tmp_path: Path, compress: bool) -> None:
    arrays = _write_set(tmp_path / "MNIST" / "raw", compress)
    bundle = load_dataset("mnist", root=tmp_path)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert torch.equal(bundle.train_x[:, 0], torch.from_numpy(arrays[STEMS[0]]))
    assert bundle.train_y.dtype == torch.int64 and bundle.train_y.tolist() == arrays[STEMS[1]].tolist()
    assert torch.equal(bundle.test_x[:, 0], torch.from_numpy(arrays[STEMS[2]]))
    assert load_dataset("mnist", root=tmp_path, subset=2, test_subset=1).train_x.shape == (2, 1, 28, 28)


def test_fashion_mnist_layouts_and_debian_folder(tmp_path: Path) -> None:
    arrays = _write_set(tmp_path / "FashionMNIST" / "raw", compress=False)
    bundle = load_dataset("fashion_mnist", root=tmp_path)
    assert bundle.class_names == FASHION_MNIST_CLASSES
    assert bundle.test_y.tolist() == arrays[STEMS[3]].tolist()
    # Debian's dataset-fashion-mnist: the four .gz files directly in /usr/share/datasets/fashion-mnist
    debian = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    arrays = _write_set(debian, compress=True, seed=1)
    bundle = load_dataset("fashion-mnist", root=debian)
    assert torch.equal(bundle.train_x[:, 0], torch.from_numpy(arrays[STEMS[0]]))


def test_missing_mnist_lists_places_and_hints(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    msg = str(err.value)
    assert str((tmp_path / "FashionMNIST" / "raw").absolute()) in msg and "download=True" in msg
    assert "dataset-fashion-mnist" in msg


def test_truncated_or_foreign_idx_files(tmp_path: Path) -> None:
    folder = tmp_path / "MNIST" / "raw"
    _write_set(folder, compress=False)
    path = folder / STEMS[0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        load_dataset("mnist", root=tmp_path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataFormatError, match="magic"):
        load_dataset("mnist", root=tmp_path)
    (folder / STEMS[0]).unlink()
    (folder / (STEMS[0] + ".gz")).write_bytes(gzip.compress(b"\x00" * 64)[:20])
    with pytest.raises(DataFormatError, match="not readable"):
        load_dataset("mnist", root=tmp_path)


def test_label_count_must_match_images(tmp_path: Path) -> None:
    folder = tmp_path / "MNIST" / "raw"
    _write_set(folder, compress=False)
    write_idx(folder / STEMS[1], np.zeros(5, np.uint8))
    with pytest.raises(DataFormatError, match="5 labels for 6 images"):
        load_dataset("mnist", root=tmp_path)
