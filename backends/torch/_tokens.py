r"""Token layers (vision transformers): activations ``(N, T, D)`` as a grid ``(N, D, *grid)``, and back.

``reshape`` is the grid's sizes (the first ``T - prod(grid)`` tokens, e.g. the class token, are
left out) or a callable ``(N, T, D) -> (N, D, *grid)``. :func:`to_grid` applies it to A and to
:math:`\partial y / \partial A`; :func:`grid_to_tokens` undoes it for the methods that perturb A.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gradcam_ref.backends._contract import shape_of


def grid_sizes(reshape: Any) -> tuple[int, ...]:
    """``reshape`` given as a grid: positive ints (a str, a float, a bool is refused by name)."""
    values = list(reshape) if isinstance(reshape, (Sequence, np.ndarray)) and not isinstance(reshape, str) else None
    if not values or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1 for v in values
    ):
        raise TypeError(
            "reshape must be a callable (N, T, D) -> (N, D, *grid) or the grid's sizes as positive ints, "
            f"e.g. (14, 14), got {reshape!r}"
        )
    return tuple(int(v) for v in values)


def to_grid(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token activations ``(N, T, D)`` and their gradients to ``(N, D, *grid)`` layout."""
    multi = gradients.ndim == activations.ndim + 1
    if callable(reshape):
        a = reshape(activations)
        g = gradients.flatten(0, 1) if multi else gradients
        g = reshape(g)
        if multi:
            g = g.reshape(*gradients.shape[:2], *g.shape[1:])
        return a, g
    return grid_of(activations, reshape), _tokens_to_grid(gradients, grid_sizes(reshape))


def grid_of(
    activations: torch.Tensor, reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Token activations ``(N, T, D)`` as ``(N, D, *grid)``: ``reshape``'s grid checked against them."""
    if callable(reshape):
        return reshape(activations)
    grid = grid_sizes(reshape)
    if activations.ndim != 3:
        raise ValueError(
            f"reshape={tuple(reshape)} turns token activations (N, T, D) into (N, D, *grid): "
            f"got activations of shape {shape_of(activations)}"
        )
    tokens = int(activations.shape[1])
    if tokens < math.prod(grid):
        raise ValueError(
            f"reshape={grid} needs at least {math.prod(grid)} tokens, the layer has T = {tokens} "
            f"(activations {shape_of(activations)})"
        )
    return _tokens_to_grid(activations, grid)


def _tokens_to_grid(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(..., T, D)`` -> ``(..., D, *grid)``: drop the first ``T - prod(grid)`` tokens."""
    kept = x[..., x.shape[-2] - math.prod(grid):, :]
    return kept.reshape(*x.shape[:-2], *grid, x.shape[-1]).movedim(-1, -1 - len(grid))


def grid_to_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`_tokens_to_grid` undone: ``(B, D, *grid)`` -> ``(B, T, D)``, the first ``T - prod(grid)``
    tokens taken from ``tokens`` ``(1, T, D)`` (e.g. the class token, which the grid leaves out)."""
    b, d = x.shape[:2]
    flat = x.movedim(1, -1).reshape(b, -1, d)
    return torch.cat([tokens[:, :tokens.shape[1] - flat.shape[1]].expand(b, -1, -1), flat], dim=1)

