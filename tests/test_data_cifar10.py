"""CIFAR-10: pickle reader on tiny fixtures in the real format, offline JPEG build, lossless subset."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipnet.data import DataFormatError, load_dataset, load_lossless_subset
from flipnet.data import cifar10 as C
from flipnet.errors import DataNotFoundError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
_OFFLINE_CANDIDATES = [Path("/work/shared/data/cifar10"), REPO.parent / "shared" / "data" / "cifar10"]
REAL_OFFLINE = next((p for p in _OFFLINE_CANDIDATES if C.is_offline_folder(p)), None)
needs_real = pytest.mark.skipif(REAL_OFFLINE is None, reason="offline CIFAR-10 folder not present")


def _write_batch(path: Path, x: np.ndarray, y: np.ndarray, protocol: int = 2) -> None:
    """A batch exactly as the official files lay it out: a dict with 'data' (N x 3072 uint8) and 'labels'."""
    batch = {
        "batch_label": "testing",
        "labels": [int(v) for v in y],
        "data": np.ascontiguousarray(x.reshape(len(x), 3072)),
        "filenames": [f"img_{i}.png" for i in range(len(y))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _make_pickles(folder: Path, per_batch: int = 4, protocol: int = 2, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in C.TRAIN_FILES:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        _write_batch(folder / name, x, y, protocol)
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
    yt = rng.integers(0, 10, per_batch)
    _write_batch(folder / C.TEST_FILE, xt, yt, protocol)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_batch_layout_rgb_planes(tmp_path: Path, protocol: int) -> None:
    x = np.zeros((2, 3, 32, 32), np.uint8)
    x[0, 0] = 255  # image 0 pure red
    x[1, 2, 5, 7] = 9  # image 1: blue plane, row 5, column 7
    _write_batch(tmp_path / "b", x, np.array([3, 7]), protocol)
    rx, ry = C.read_cifar_batch(tmp_path / "b")
    assert rx.shape == (2, 3, 32, 32) and rx.dtype == np.uint8
    assert ry.tolist() == [3, 7] and ry.dtype == np.int64
    assert rx[0, 0].min() == 255 and rx[0, 1:].max() == 0
    assert rx[1, 2, 5, 7] == 9 and rx[1].sum() == 9


def test_read_batch_written_by_old_numpy(tmp_path: Path) -> None:
    """The official files name numpy.core.multiarray (NumPy 1.x); NumPy 2 calls it numpy._core."""
    x = np.arange(3072, dtype=np.int64).astype(np.uint8).reshape(1, 3, 32, 32)
    _write_batch(tmp_path / "b", x, np.array([4]), protocol=2)
    raw = (tmp_path / "b").read_bytes()
    assert b"cnumpy._core.multiarray\n" in raw  # protocol 2: GLOBAL opcode with newline-ended names
    (tmp_path / "b").write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        rx, ry = C.read_cifar_batch(tmp_path / "b")
    assert np.array_equal(rx, x) and ry.tolist() == [4]


@pytest.mark.parametrize("layout", ["parent", "batches_dir"])
def test_load_cifar10_from_pickle_folder(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    x, y, xt, yt = _make_pickles(folder)
    bundle = load_dataset("cifar10", root=tmp_path if layout == "parent" else folder)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert bundle.class_names == C.CIFAR10_CLASSES
    assert torch.equal(bundle.train_x, torch.from_numpy(x)) and torch.equal(bundle.train_y, torch.from_numpy(y))
    assert torch.equal(bundle.test_x, torch.from_numpy(xt)) and torch.equal(bundle.test_y, torch.from_numpy(yt))
    small = load_dataset("cifar10", root=tmp_path, subset=6, test_subset=3)
    assert len(small.train_x) == 6 and len(small.test_x) == 3
    assert torch.equal(small.train_x, bundle.train_x[:6])


def test_default_root_finds_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIPNET_DATA", str(tmp_path))
    x, *_ = _make_pickles(tmp_path / "cifar10" / "cifar-10-batches-py")
    assert torch.equal(load_dataset("cifar10").train_x, torch.from_numpy(x))


def test_missing_cifar10_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert str((tmp_path / "nowhere" / "cifar-10-batches-py").absolute()) in msg
    assert "download=True" in msg and "cifar10_jpgs.tar.gz" in msg


def test_truncated_and_foreign_pickles_raise_clear_errors(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _make_pickles(folder)
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [1, 2]}, f)
    with pytest.raises(DataFormatError, match="labels"):
        load_dataset("cifar10", root=tmp_path)
    _write_batch(folder / "data_batch_3", np.zeros((2, 3, 32, 32), np.uint8), np.array([1, 10]))
    with pytest.raises(DataFormatError, match="0..9"):
        load_dataset("cifar10", root=tmp_path)


def test_corrupt_pickle_bytes_raise_data_format_error(tmp_path: Path) -> None:
    # Damaged length fields, encodings or keys must give the one-line DataFormatError, not a
    # MemoryError/OverflowError/LookupError/TypeError traceback.
    x = np.zeros((2, 3, 32, 32), np.uint8)
    C.write_cifar_batch(tmp_path / "ok", x, np.array([1, 2]), "t")
    raw = (tmp_path / "ok").read_bytes()
    i = next(pos for op, _, pos in pickletools.genops(raw) if op.name == "FRAME")
    huge = raw[: i + 1] + (2**62).to_bytes(8, "little") + raw[i + 9 :]  # MemoryError
    overflow = raw[: i + 1] + b"\xff" * 8 + raw[i + 9 :]  # OverflowError
    with open(tmp_path / "enc", "wb") as f:  # protocol 2 stores bytes via _codecs.encode(..., "latin1")
        pickle.dump({"data": x.reshape(2, -1), "labels": [1, 2]}, f, protocol=2)
    bad_enc = (tmp_path / "enc").read_bytes().replace(b"latin1", b"lxtin1")  # LookupError
    with open(tmp_path / "keys", "wb") as f:
        pickle.dump({1: 2, "a": 3}, f, protocol=2)
    for name, data in (("huge", huge), ("overflow", overflow), ("enc", bad_enc)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=name):
            C.read_cifar_batch(tmp_path / name)
    with pytest.raises(DataFormatError, match="expected keys"):
        C.read_cifar_batch(tmp_path / "keys")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_reader_refuses_code(tmp_path: Path) -> None:
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(DataFormatError, match="refusing"):
        C.read_cifar_batch(tmp_path / "evil")


# ---- a tiny offline folder in the real layout (labels_51000.npy + train/<class>/NNNN.jpg) ----


def _jpeg(rng: np.random.Generator) -> bytes:
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_offline(folder: Path, n_train: int, n_test: int, skip: str | None = None, seed: int = 0) -> dict[str, bytes]:
    """Offline folder holding only the JPEGs of the first n_train / n_test images of each split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, 51_000).astype(np.uint8)
    np.save(folder / C.OFFLINE_LABELS, labels)
    y_train = labels[:50_000].astype(np.int64)
    _, y_test = C._offline_labels(folder)
    files: dict[str, bytes] = {}
    for split, y, n in (("train", y_train, n_train), ("test", y_test, n_test)):
        for c in range(10):
            for rank in range(int((y[:n] == c).sum())):
                files[f"{split}/{C.CIFAR10_CLASSES[c]}/{rank:04d}.jpg"] = _jpeg(rng)
    names = list(files)
    rng.shuffle(names)  # archive order is arbitrary
    with tarfile.open(folder / C.OFFLINE_ARCHIVE, "w:gz") as tar:
        for name in names:
            if name == skip:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return files


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def test_offline_subset_decode_places_each_image(tmp_path: Path) -> None:
    files = _make_offline(tmp_path / "off", n_train=40, n_test=25)
    bundle = load_dataset("cifar10", root=tmp_path / "off", subset=40, test_subset=25, cache_dir=tmp_path / "cache")
    assert bundle.info["source"] == "jpeg-rebuild" and len(bundle.train_x) == 40 and len(bundle.test_x) == 25
    labels = np.load(tmp_path / "off" / C.OFFLINE_LABELS).astype(np.int64)
    assert bundle.train_y.tolist() == labels[:40].tolist()
    assert bundle.test_y.tolist() == labels[50_000:50_025].tolist()
    for split, x, y in (("train", bundle.train_x, bundle.train_y), ("test", bundle.test_x, bundle.test_y)):
        seen = {c: 0 for c in range(10)}
        for i, c in enumerate(y.tolist()):  # image i is the seen[c]-th image of class c
            want = _decoded(files[f"{split}/{C.CIFAR10_CLASSES[c]}/{seen[c]:04d}.jpg"])
            assert np.array_equal(x[i].numpy(), want)
            seen[c] += 1
    assert not (tmp_path / "cache").exists()  # a subset decode writes no cache


def test_offline_test_order_keeps_first_thousand_and_class_balance(tmp_path: Path) -> None:
    _make_offline(tmp_path / "off", n_train=0, n_test=0)
    y_train, y_test = C._offline_labels(tmp_path / "off")
    labels = np.load(tmp_path / "off" / C.OFFLINE_LABELS)
    assert len(y_train) == 50_000 and len(y_test) == 10_000
    assert np.array_equal(y_test[:1000], labels[50_000:])
    assert np.bincount(y_test, minlength=10).tolist() == [1000] * 10


def test_offline_archive_missing_image_or_truncated(tmp_path: Path) -> None:
    files = _make_offline(tmp_path / "off", n_train=20, n_test=5)
    victim = sorted(n for n in files if n.startswith("train/"))[0]
    _make_offline(tmp_path / "off2", n_train=20, n_test=5, skip=victim)
    with pytest.raises(DataFormatError, match="lacks"):
        load_dataset("cifar10", root=tmp_path / "off2", subset=20, test_subset=5)
    archive = tmp_path / "off" / C.OFFLINE_ARCHIVE
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        load_dataset("cifar10", root=tmp_path / "off", subset=20, test_subset=5)


def test_offline_folder_reuses_a_complete_cache(tmp_path: Path) -> None:
    off = tmp_path / "off"
    off.mkdir()
    np.save(off / C.OFFLINE_LABELS, np.zeros(51_000, np.uint8))
    (off / C.OFFLINE_ARCHIVE).write_bytes(b"not read when the cache is complete")
    batches = tmp_path / "cache" / "cifar-10-batches-py"
    x, *_ = _make_pickles(batches)
    (batches / C.BUILD_MARKER).write_text(json.dumps({"source": "jpeg-rebuild"}))
    bundle = load_dataset("cifar10", root=off, cache_dir=tmp_path / "cache")
    assert torch.equal(bundle.train_x, torch.from_numpy(x))
    assert bundle.info["source"] == "jpeg-rebuild"
    (batches / C.BUILD_MARKER).unlink()  # an interrupted build (no marker) is redone: here it hits the bogus archive
    with pytest.raises(DataFormatError):
        load_dataset("cifar10", root=off, cache_dir=tmp_path / "cache")


def test_write_cifar_batch_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    C.write_cifar_batch(tmp_path / "b", x, np.arange(5), "b")
    with open(tmp_path / "b", "rb") as f:
        raw = pickle.load(f, encoding="latin1")  # readable like the official files
    assert raw["data"].shape == (5, 3072) and raw["labels"] == [0, 1, 2, 3, 4]
    rx, ry = C.read_cifar_batch(tmp_path / "b")
    assert np.array_equal(rx, x) and ry.tolist() == list(range(5))


def test_lossless_subset_from_npz_fixture(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = {
        "x_train_first4000": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "y_train_first4000": rng.integers(0, 10, 8).astype(np.uint8),
        "x_test_first1000": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "y_test_first1000": rng.integers(0, 10, 4).astype(np.uint8),
    }
    np.savez(tmp_path / C.LOSSLESS_FILE, **arrays)
    bundle = load_lossless_subset(tmp_path)
    assert torch.equal(bundle.test_x, torch.from_numpy(arrays["x_test_first1000"]).permute(0, 3, 1, 2))
    assert bundle.train_y.dtype == torch.int64 and len(bundle.train_y) == 8
    assert load_dataset("cifar10_lossless", root=tmp_path, test_subset=2).test_x.shape == (2, 3, 32, 32)
    del arrays["y_test_first1000"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match="y_test_first1000"):
        load_lossless_subset(tmp_path / "bad.npz")
    with pytest.raises(DataNotFoundError, match="lossless"):
        load_lossless_subset(tmp_path / "missing")


# ---- the real offline folder (skipped when absent) ----


@needs_real
def test_real_offline_subset_matches_lossless_originals(tmp_path: Path) -> None:
    start = time.perf_counter()
    bundle = load_dataset("cifar10", root=REAL_OFFLINE, subset=300, test_subset=200, cache_dir=tmp_path / "cache")
    elapsed = time.perf_counter() - start
    lossless = load_lossless_subset(REAL_OFFLINE)
    assert lossless.train_x.shape == (4000, 3, 32, 32) and lossless.test_x.shape == (1000, 3, 32, 32)
    assert torch.equal(bundle.train_y, lossless.train_y[:300])
    assert torch.equal(bundle.test_y, lossless.test_y[:200])
    mae = (bundle.train_x.float() - lossless.train_x[:300].float()).abs().mean().item()
    assert 2.0 < mae < 10.0  # JPEG quality 75: about 5.8/255 on average, never exact
    mae_test = (bundle.test_x.float() - lossless.test_x[:200].float()).abs().mean().item()
    assert 2.0 < mae_test < 10.0
    assert elapsed < 30.0


@needs_real
@pytest.mark.slow
def test_real_offline_full_build_matches_reference_and_is_reused(tmp_path: Path) -> None:
    start = time.perf_counter()
    bundle = load_dataset("cifar10", root=REAL_OFFLINE, cache_dir=tmp_path)
    build_s = time.perf_counter() - start
    marker = json.loads((tmp_path / "cifar-10-batches-py" / C.BUILD_MARKER).read_text())
    assert marker["md5_matches_reference"], marker["md5"]
    assert len(bundle.train_x) == 50_000 and len(bundle.test_x) == 10_000
    assert np.bincount(bundle.train_y.numpy()).tolist() == [5000] * 10
    start = time.perf_counter()
    again = load_dataset("cifar10", root=REAL_OFFLINE, cache_dir=tmp_path)
    assert time.perf_counter() - start < build_s / 3
    assert torch.equal(again.test_x, bundle.test_x)
