"""The benchmarked models, their Grad-CAM layer, inputs and targets: the same for every method.

- ``resnet18``, ``resnet50``: torchvision, random init (``weights=None``; speed does not depend
  on the weights), eval mode, layer ``layer4`` (N, 512|2048, 7, 7);
- ``efficientnet_lite0``: the zoo's pretrained model (``backends/zoo``), layer ``_bn1``, the
  head's last batch-norm (N, 1280, 7, 7). Its ReLU6 module ``_swish`` is shared by the stem and
  the head (called twice per pass), which the peers cannot hook unambiguously, so every method
  takes the output of the module just before it.
- ``tiny``: a 2-conv net for the smoke test (``tests/test_benchmarks.py``), layer ``1``.

Inputs are seeded standard normal images ``(N, 3, 224, 224)`` float32 (``(N, 3, 32, 32)`` for
``tiny``); targets are fixed classes, never the argmax, so that every method explains exactly
the same scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MODELS = ("resnet18", "resnet50", "efficientnet_lite0")


def _resnet(depth: int) -> Callable[[], Any]:
    def build() -> Any:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()

    return build


def _efficientnet_lite0() -> Any:
    from gradcam_ref.zoo import efficientnet_lite0

    return efficientnet_lite0.load_torch()


def _tiny() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


# name -> (builder, layer name, image size, number of classes)
_SPECS: dict[str, tuple[Callable[[], Any], str, int, int]] = {
    "resnet18": (_resnet(18), "layer4", 224, 1000),
    "resnet50": (_resnet(50), "layer4", 224, 1000),
    "efficientnet_lite0": (_efficientnet_lite0, "_bn1", 224, 1000),
    "tiny": (_tiny, "1", 32, 10),
}


def build(name: str) -> tuple[Any, str]:
    """``(model, layer)``: a fresh model in eval mode and the dotted name of its Grad-CAM layer."""
    if name not in _SPECS:
        raise ValueError(f"model must be one of {sorted(_SPECS)}, got {name!r}")
    builder, layer, _, _ = _SPECS[name]
    return builder(), layer


def inputs(name: str, batch: int) -> Any:
    """Seeded N(0, 1) images ``(batch, 3, size, size)``, float32."""
    import torch

    size = _SPECS[name][2]
    x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    return torch.from_numpy(x)


def targets(name: str, batch: int, per_image: int) -> np.ndarray:
    """Fixed classes: ``(batch,)`` for one target per image, else ``(batch, per_image)``, distinct."""
    classes = _SPECS[name][3]
    step = max(1, classes // max(per_image, 1))
    grid = (np.arange(batch)[:, None] * 7 + 3 + np.arange(per_image)[None, :] * step) % classes
    return grid[:, 0].astype(np.int64) if per_image == 1 else grid.astype(np.int64)
