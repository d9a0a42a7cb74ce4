"""Randomised copies of a torch model for the model parameter randomisation test (Adebayo et al. 2018).

The user's model is never touched: the randomised model is one ``copy.deepcopy`` of it. Two schemes:

- ``'redraw'`` (default): a layer is a module with parameters of its own (``recurse=False``):
  convolutions, linear layers, normalisation layers. Modules without parameters (ReLU, pooling,
  dropout) have nothing to randomise and are not layers here. Each parameter is redrawn from a
  normal distribution with the tensor's own mean and standard deviation (1 where the tensor is
  constant, as a fresh BatchNorm's weight = 1, bias = 0), seeded per layer (``seed + k``);
  BatchNorm's running statistics (buffers) are kept, so BatchNorm really is randomised.
- ``'quantus'``: Quantus 0.6's ``get_random_layer_generator``: a layer is a module with a
  ``reset_parameters`` method, randomised by ``torch.manual_seed(seed + 1); module.reset_parameters()``
  (the same seed for every layer; the torch RNG state is restored afterwards). For BatchNorm that is
  weight 1, bias 0, running mean 0 and variance 1: the identity (up to eps), not a random layer.

Both yield the copies from the top layer (the logits) down.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["SCHEMES", "layers", "randomise_module", "randomised"]

SCHEMES = ("redraw", "quantus")
"""How a layer is randomised: our redraw with the tensor's statistics, or Quantus's ``reset_parameters``."""


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def layers(model: nn.Module, *, scheme: str = "redraw") -> list[str]:
    """The names of the layers that ``scheme`` randomises, in registration order (forward order for
    sequential models): modules owning parameters (``'redraw'``), or modules with a
    ``reset_parameters`` method (``'quantus'``)."""
    _check_scheme(scheme)
    if scheme == "quantus":
        return [name for name, module in model.named_modules() if hasattr(module, "reset_parameters")]
    return [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def randomise_module(module: nn.Module, seed: int, *, scheme: str = "redraw") -> None:
    """Randomise ``module`` itself in place, seeded: redraw its own parameters (``'redraw'``), or
    Quantus's ``torch.manual_seed(seed + 1); module.reset_parameters()`` with the global torch RNG
    restored afterwards (``'quantus'``)."""
    _check_scheme(scheme)
    if scheme == "quantus":
        devices = sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed + 1)
            module.reset_parameters()  # type: ignore[operator]
        return
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
               names: Sequence[str] | None = None, scheme: str = "redraw") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer name, randomised copy)`` from the top layer (the logits) down.

    Args:
      model: left exactly as it is.
      order: ``'cascading'`` (layer k and every layer above it randomised; Quantus's ``'top_down'``)
        or ``'independent'`` (only layer k; the previous layer is restored from a saved copy of its own
        state, so no model is copied per layer). One copy, changed between yields: use each before
        asking for the next.
      seed: ``'redraw'``: layer k (in forward order) is redrawn with seed ``seed + k``, in both orders.
        ``'quantus'``: Quantus's ``seed`` (default 42 there): every layer with ``seed + 1``.
      names: the layers to randomise (default: :func:`layers`), in forward order.
      scheme: ``'redraw'`` (default) or ``'quantus'`` (see the module's docstring).

    Example, Quantus 0.6's ``MPRT(layer_order="top_down", seed=42)`` randomisation::

        randomised(model, order="cascading", seed=42, scheme="quantus")
    """
    if order not in ("cascading", "independent"):
        raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
    available = layers(model, scheme=scheme)
    chosen = list(available if names is None else names)
    for name in chosen:
        if name not in available:
            what = "has no parameters of its own" if scheme == "redraw" else "has no reset_parameters"
            raise ValueError(f"layer {name!r} {what} to randomise; layers of scheme {scheme!r}: "
                             f"{available[:8]}{' ...' if len(available) > 8 else ''}")
    target = copy.deepcopy(model)
    for k in reversed(range(len(chosen))):
        name = chosen[k]
        module = target.get_submodule(name)
        saved = {key: value.clone() for key, value in module.state_dict().items()} if order == "independent" else None
        randomise_module(module, seed + k if scheme == "redraw" else seed, scheme=scheme)
        yield name, target
        if saved is not None:  # independent: the layer back as it was, for the next one
            module.load_state_dict(saved)
