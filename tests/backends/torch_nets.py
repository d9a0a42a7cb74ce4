"""Test helpers for torch models: what ``explain`` must leave as it was, and a check of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets run fastest on one thread (and the test machine's cores are shared); a module that
    imports this fixture runs its tests so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def randomised_batch_norms(model: nn.Module, mean: tuple[float, float] = (-0.5, 0.5),
                           var: tuple[float, float] = (0.5, 2.0), weight: tuple[float, float] = (0.5, 1.5),
                           bias: tuple[float, float] = (-0.2, 0.2)) -> nn.Module:
    """``model`` in eval mode with each ``BatchNorm2d``'s statistics and affine parameters drawn
    uniformly from the given ranges (away from (0, 1), so that folding them matters)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(*mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
    return model.eval()
