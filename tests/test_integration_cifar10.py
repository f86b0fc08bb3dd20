"""Real-data integration: one epoch of the full BinaryNet on 2,000 offline CIFAR-10 images, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from flipnet.train import Trainer, load_config

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = (REPO.parent / "shared" / "data" / "cifar10", REPO / "shared" / "data" / "cifar10")


def _offline_cifar10() -> Path:
    for root in CANDIDATES:
        if (root / "cifar10_jpgs.tar.gz").is_file() or (root / "cifar-10-batches-py").is_dir():
            return root
    pytest.skip("no offline CIFAR-10 folder (../shared/data/cifar10) next to this checkout")


@pytest.mark.slow
def test_one_epoch_of_binarynet_on_2000_offline_images(tmp_path: Path) -> None:
    root = _offline_cifar10()
    config = load_config(
        "bop_cifar10",
        [
            f"data.root={root}",
            f"data.options={{cache_dir: {tmp_path / 'cache'}}}",
            "data.subset=2000",
            "data.val_size=200",  # the recipe holds out 5,000 of the full 50,000
            "data.test_subset=500",
            "train.epochs=1",
            "train.progress=false",
            "train.tensorboard=false",
            f"output.dir={tmp_path}",
            "output.name=cifar_1epoch",
        ],
    )
    trainer = Trainer.from_config(config)
    assert trainer.steps_per_epoch == 36  # 2,000 - 200 validation images at the paper's batch size of 50
    row = trainer.fit()
    assert row["epoch"] == 1 and row["step"] == 36
    assert row["test_acc"] > 0.10 + 0.03  # better than chance after 40 Bop steps
    assert (trainer.run_dir / "checkpoints" / "last.pt").is_file()
    assert (trainer.run_dir / "metrics.csv").read_text().count("\n") == 2
