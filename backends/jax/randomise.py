"""Randomised parameters of a JAX model for the model parameter randomisation test (Adebayo et al. 2018).

JAX parameters are immutable pytrees: every item is a new pytree and the caller's parameters are
untouched. A layer is a top-level key of ``params`` (a Flax ``params['params']`` dict, an Equinox
or hand-written dict of layers), in the dict's order (forward order). Each leaf is redrawn from a
normal distribution with the leaf's own mean and standard deviation (1 where the leaf is
constant: a fresh BatchNorm's scale = 1, bias = 0), as in the torch backend's randomise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["randomise_layer", "randomised"]


def randomise_layer(layer: Any, seed: int) -> Any:
    """Every leaf of the pytree ``layer`` redrawn, seeded."""
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    new = []
    for key, leaf in zip(keys, leaves, strict=False):
        leaf = jnp.asarray(leaf)
        mean = jnp.mean(leaf)
        std = jnp.std(leaf, ddof=1) if leaf.size > 1 else jnp.zeros((), leaf.dtype)
        scale = jnp.where(std > 0, std, 1.0)
        new.append((mean + scale * jax.random.normal(key, leaf.shape, jnp.float64 if leaf.dtype == jnp.float64
                                                      else jnp.float32)).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def randomised(params: Mapping[str, Any], *, order: str = "cascading",
               seed: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(layer name, randomised params)`` from the last layer down: ``'cascading'`` (that layer
    and all after it) or ``'independent'`` (that layer only). Layer k is redrawn with seed ``seed + k``."""
    if order not in ("cascading", "independent"):
        raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"params must be a non-empty mapping of layer name -> parameters, got {type(params).__name__}")
    names = list(params)
    current = dict(params)
    for k in reversed(range(len(names))):
        name = names[k]
        base = current if order == "cascading" else dict(params)
        base[name] = randomise_layer(params[name], seed + k)
        if order == "cascading":
            current = base
        yield name, dict(base)
