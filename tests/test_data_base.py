"""DatasetBundle, the registry, digits and synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flipnet.data import DatasetBundle, default_root, list_datasets, load_dataset, make_loader
from flipnet.errors import ConfigError, FlipnetError

torch.set_num_threads(1)


def test_registry_lists_every_data_set() -> None:
    names = list_datasets()
    expected = {"digits", "cifar10", "cifar10_lossless", "mnist", "fashion_mnist", "svhn", "oxford_pets", "synthetic"}
    assert expected <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())


def test_unknown_name_and_option_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'imagenett'; did you mean 'imagenet'.*digits"):
        load_dataset("imagenett")
    with pytest.raises(ConfigError, match="no option 'sbuset'.*subset"):
        load_dataset("digits", sbuset=10)
    with pytest.raises(ConfigError, match="subset"):
        load_dataset("digits", subset=0)
    assert issubclass(ConfigError, FlipnetError)


def test_dataset_options_is_public_and_misspellings_get_a_suggestion() -> None:
    from flipnet.data import dataset_options

    assert dataset_options("digits") == {"subset": None, "test_subset": None}
    assert {"download", "subset", "test_subset"} <= set(dataset_options("Fashion-MNIST"))
    assert "root" not in dataset_options("cifar10")
    with pytest.raises(ConfigError, match="unknown data set 'digitz'; did you mean 'digits'\\?"):
        dataset_options("digitz")
    with pytest.raises(ConfigError, match="unknown data set 'digitz'; did you mean 'digits'\\?"):
        load_dataset("digitz")
    with pytest.raises(ConfigError, match="no option 'sbuset'; did you mean 'subset'\\?"):
        load_dataset("digits", sbuset=10)


def test_dataset_shape_is_known_without_reading_data() -> None:
    from flipnet.data import dataset_shape

    assert dataset_shape("cifar10") == ((3, 32, 32), 10)  # nothing under ./data is needed
    assert dataset_shape("mnist", download=True) == ((1, 28, 28), 10)
    assert dataset_shape("oxford_pets") == ((3, 128, 128), 3)
    assert dataset_shape("oxford_pets", image_size=(64, 96), task="classification") == ((3, 64, 96), 37)
    with pytest.raises(ConfigError, match="no option 'imagesize'; did you mean 'image_size'"):
        dataset_shape("oxford_pets", imagesize=64)
    with pytest.raises(ConfigError, match="image_size must be"):
        dataset_shape("oxford_pets", image_size=0)


def test_default_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLIPNET_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("FLIPNET_DATA")
    assert default_root() == Path("data")


def test_digits_split_is_fixed_and_stratified() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train_x), len(a.test_x)) == (1437, 360)
    assert a.train_x.shape[1:] == (1, 8, 8) and a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert int(a.train_x.max()) == 255 and int(a.train_x.min()) == 0
    assert set(torch.unique(a.train_x).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 * class share
    # the split is a partition of all 1,797 images
    from sklearn.datasets import load_digits

    ref = np.rint(load_digits().images * (255 / 16)).astype(np.uint8).reshape(1797, -1)
    every = torch.cat([a.train_x, a.test_x]).view(1797, -1).numpy()
    assert sorted(map(bytes, every)) == sorted(map(bytes, ref))
    small = load_dataset("digits", subset=100, test_subset=10)
    assert torch.equal(small.train_x, a.train_x[:100]) and len(small.test_y) == 10


def test_bundle_validates_its_tensors() -> None:
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        DatasetBundle("t", x.float(), y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="int64"):
        DatasetBundle("t", x, y.int(), x, y, num_classes=2)
    with pytest.raises(ValueError, match="shape"):
        DatasetBundle("t", x, y[:3], x, y, num_classes=2)
    with pytest.raises(ValueError, match="class names"):
        DatasetBundle("t", x, y, x, y, num_classes=2, class_names=("a",))
    seg = DatasetBundle("s", x, torch.zeros(4, 2, 2, dtype=torch.int64), x, torch.zeros(4, 2, 2, dtype=torch.int64),
                        num_classes=2, task="segmentation")
    assert seg.input_shape == (1, 2, 2) and seg.in_channels == 1
    with pytest.raises(ValueError, match="shape"):
        DatasetBundle("s", x, y, x, y, num_classes=2, task="segmentation")


def test_synthetic_is_seeded_and_shaped() -> None:
    a = load_dataset("synthetic", shape=(3, 5, 7), num_classes=4, num_train=40, num_test=12, seed=1)
    b = load_dataset("synthetic", shape=(3, 5, 7), num_classes=4, num_train=40, num_test=12, seed=1)
    c = load_dataset("synthetic", shape=(3, 5, 7), num_classes=4, num_train=40, num_test=12, seed=2)
    assert a.input_shape == (3, 5, 7) and a.num_classes == 4 and len(a.test_x) == 12
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [10, 10, 10, 10]
    with pytest.raises(ConfigError, match="shape"):
        load_dataset("synthetic", shape=(8, 8))


def test_synthetic_rule_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    d = load_dataset("synthetic", shape=(1, 8, 8), num_classes=10, num_train=1000, num_test=300, seed=0)
    flat = lambda t: t.view(len(t), -1).float().numpy() / 255.0  # noqa: E731
    clf = LogisticRegression(max_iter=300).fit(flat(d.train_x), d.train_y.numpy())
    assert clf.score(flat(d.test_x), d.test_y.numpy()) > 0.9  # chance is 0.1


def test_synthetic_segmentation_rule_is_learnable() -> None:
    d = load_dataset("synthetic", task="segmentation", shape=(1, 16, 16), num_classes=3, num_train=64, num_test=32, seed=0)
    assert d.task == "segmentation" and d.train_y.shape == (64, 16, 16)
    # the per-pixel rule: class = intensity band; fit thresholds on train, apply to test
    x, y = d.train_x[:, 0].float().flatten(), d.train_y.flatten()
    means = torch.stack([x[y == k].mean() for k in range(3)])
    pred = (d.test_x[:, 0].float().unsqueeze(-1) - means).abs().argmin(-1)
    assert (pred == d.test_y).float().mean() > 0.95  # chance is about 1/3


def test_subset_keeps_the_first_examples() -> None:
    d = load_dataset("synthetic", num_train=20, num_test=10)
    s = d.subset(train=5)
    assert torch.equal(s.train_x, d.train_x[:5]) and len(s.test_x) == 10 and s.info["subset"]["train"] == 5
    with pytest.raises(ValueError):
        d.subset(train=0)


def test_digits_end_to_end_with_make_loader() -> None:
    d = load_dataset("digits")
    loader = make_loader(d, "train", 128, train=True, device="cpu", augment=False, seed=0)
    xs, ys = zip(*loader)
    assert sum(len(y) for y in ys) == 1437 and len(loader) == 12
    assert np.isclose(float(torch.cat(xs).max()), 1.0) and np.isclose(float(torch.cat(xs).min()), -1.0)
