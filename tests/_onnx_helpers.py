"""Small trained models on a real test set (scikit-learn digits), shared by the ONNX and QONNX tests.

Training is a few epochs of Adam on the latent weights (the straight-through estimator), enough
for BatchNorm statistics and weights to look like a trained network's (accuracy well above
chance), on two CPU cores in a few seconds.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipnet.data import load_dataset, scale_images
from flipnet.models import create_model

#: (model name, create_model kwargs, input upsampling factor of the 8×8 digits)
MODELS: dict[str, tuple[str, dict, int]] = {
    "binary_mlp": ("binary_mlp", {"input_size": 8, "hidden_sizes": (128, 128)}, 1),
    "binarynet": ("binarynet", {"input_size": 16, "filters": 16, "dense_units": 64, "pad_value": 1.0}, 2),
    "resnet20": ("resnet20", {"base_width": 8}, 2),
}


def digits(split: str, factor: int) -> tuple[Tensor, Tensor]:
    """Digits images scaled to [-1, 1] like the trainer does, upsampled ``factor``× (nearest)."""
    x, y = load_dataset("digits").split(split)
    x = scale_images(x)
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="nearest")
    return x, y


@lru_cache(maxsize=None)
def trained(key: str, epochs: int = 4) -> tuple[nn.Module, tuple[int, ...]]:
    """The model ``key`` of :data:`MODELS`, trained briefly on digits, in eval mode, and its input shape."""
    name, kwargs, factor = MODELS[key]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1, **kwargs)
    x, y = digits("train", factor)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tuple(x.shape[1:])


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)
