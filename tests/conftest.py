"""Shared pytest configuration: GPU tests skip cleanly without CUDA, plots never open windows."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolate_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write into the user's data or run folders by accident."""
    if "FLIPNET_DATA" not in os.environ:
        monkeypatch.setenv("FLIPNET_DATA", str(tmp_path_factory.getbasetemp() / "flipnet-data"))
