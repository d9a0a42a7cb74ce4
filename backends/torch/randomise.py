"""Randomised copies of a torch model for the model parameter randomisation test (Adebayo et al. 2018).

The user's model is never touched: every copy is a ``copy.deepcopy``. A layer is a module with
parameters of its own (``recurse=False``): convolutions, linear layers, normalisation layers.
Modules without parameters (ReLU, pooling, dropout) have nothing to randomise and are not layers
here. Each randomised tensor is redrawn from a normal distribution with the tensor's own mean and
standard deviation (1 where the tensor is constant, as a fresh BatchNorm's weight = 1, bias = 0:
re-initialising BatchNorm with ``reset_parameters`` would make it the identity, as Quantus does).
BatchNorm's running statistics (buffers) are kept. Seeded: the same seed, the same copies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["layers", "randomise_module", "randomised"]


def layers(model: nn.Module) -> list[str]:
    """The names of the modules that own parameters, in registration order (forward order for
    sequential models)."""
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def randomise_module(module: nn.Module, seed: int) -> None:
    """Redraw every parameter of ``module`` itself (not its children) in place, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            values = parameter.detach().double().cpu()
            mean = values.mean()
            std = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
            scale = std if std > 0 else torch.ones((), dtype=torch.float64)
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_((mean + scale * noise).to(parameter.dtype))


def randomised(model: nn.Module, *, order: str = "cascading", seed: int = 0,
               names: Sequence[str] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer name, randomised copy)`` from the top layer (the logits) down.

    Args:
      model: left exactly as it is.
      order: ``'cascading'`` (layer k and every layer above it randomised; one copy, changed between
        yields: use each before asking for the next) or ``'independent'`` (only layer k; a fresh copy
        each time).
      seed: layer k (in forward order) is redrawn with seed ``seed + k``, in both orders.
      names: the layers to randomise (default: :func:`layers`), in forward order.
    """
    if order not in ("cascading", "independent"):
        raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
    available = layers(model)
    chosen = list(available if names is None else names)
    for name in chosen:
        if name not in available:
            raise ValueError(f"layer {name!r} has no parameters of its own to randomise; layers with "
                             f"parameters: {available[:8]}{' ...' if len(available) > 8 else ''}")
    copy_ = copy.deepcopy(model) if order == "cascading" else None
    for k in reversed(range(len(chosen))):
        name = chosen[k]
        target = copy_ if copy_ is not None else copy.deepcopy(model)
        randomise_module(target.get_submodule(name), seed + k)
        yield name, target
