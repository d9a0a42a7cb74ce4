"""Test helpers: the NumPy oracle's networks rebuilt as torch modules with the same weights.

``torch_from_oracle(oracle)`` is an ``nn.Sequential`` whose submodules carry the oracle's layer
names (``"conv0"``, ``"relu0"``, ...) and end in ``"head"``, so that a layer name means the same
tensor in both; ``model[:-1]`` and ``model.head`` are the split form ``(features, head)``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from gradcam_ref.backends.numpy_backend import Oracle
from torch import nn

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class GlobalAvgPool(nn.Module):
    """Mean over every spatial axis: ``(N, K, *spatial) -> (N, K)``, for any spatial rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


def _linear(weight: np.ndarray, bias: np.ndarray, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


def torch_from_oracle(
    oracle: Oracle, dtype: torch.dtype = torch.float64, inplace: bool = True
) -> nn.Sequential:
    """The oracle as an eval-mode ``nn.Sequential`` (valid, stride-1 convs), same weights.

    ``inplace`` uses ``ReLU(inplace=True)``, the case that breaks naive gradient hooks.
    """
    parts: list[tuple[str, nn.Module]] = []
    for i, (weight, bias) in enumerate(oracle.convs):
        conv = CONVS[weight.ndim - 2](weight.shape[1], weight.shape[0], weight.shape[2:]).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.as_tensor(weight))
            conv.bias.copy_(torch.as_tensor(bias))
        parts += [(f"conv{i}", conv), (f"relu{i}", nn.ReLU(inplace=inplace))]
    if oracle.head == "gap":
        head = nn.Sequential(GlobalAvgPool(), _linear(*oracle.head_params[0], dtype))
    elif oracle.head == "gap-mlp":
        (w1, b1), (w2, b2) = oracle.head_params
        head = nn.Sequential(GlobalAvgPool(), _linear(w1, b1, dtype), nn.ReLU(), _linear(w2, b2, dtype))
    else:
        head = nn.Sequential(nn.Flatten(), _linear(*oracle.head_params[0], dtype))
    parts.append(("head", head))
    return nn.Sequential(OrderedDict(parts)).eval()


def model_state(model: nn.Module) -> dict:
    """Everything about a model that explain must leave as it was."""
    return {
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks))
            for name, m in model.named_modules()
        ],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "values": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["hooks"] == after["hooks"]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["grads"] == after["grads"]
    assert before["values"].keys() == after["values"].keys()
    for key, value in before["values"].items():
        assert torch.equal(value, after["values"][key]), key
