"""Backends: where the activations, gradients and scores at a layer come from.

One module per framework (``numpy_backend``, ``torch_backend``, ``jax_backend``), each exposing

- ``NAME``: its name, as passed to ``explain(..., backend=NAME)``;
- ``capture(model, inputs, target, *, layer, **options) -> gradcam_ref.Capture``: run the model,
  return A, dy/dA and y at ``layer`` (the core does all the Grad-CAM math);
- optionally ``explain(model, inputs, target, *, layer, **options) -> gradcam_ref.Explanation``:
  used by ``gradcam_ref.explain`` instead of ``capture``, for a backend that runs the core's math
  inside its own compiled program (``jax_backend``: one ``jax.jit`` for the whole explanation).

A framework is imported only when its backend is used. Detection looks at the frameworks the
caller has already imported (``sys.modules``), as einops does: a torch model cannot exist unless
torch was imported, so nothing is imported to recognise one.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

BACKENDS = ("numpy", "torch", "jax")

__all__ = ["BACKENDS", "load", "select"]


def load(name: str) -> ModuleType:
    """The backend module called ``name``; imports its framework."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}_backend")


def select(model: Any, inputs: Any, backend: str | None = None) -> ModuleType:
    """The backend for ``model`` and ``inputs``: ``backend`` if given, else detected."""
    if backend is not None:
        return load(backend)
    for name in BACKENDS:
        if _DETECTORS[name](model, inputs):
            return load(name)
    raise TypeError(
        f"cannot tell which framework model of type {type(model).__module__}."
        f"{type(model).__qualname__} (inputs: {type(inputs).__module__}.{type(inputs).__qualname__}) "
        f"belongs to; pass backend= one of {BACKENDS}"
    )


def _parts(model: Any) -> tuple[Any, ...]:
    """The model, or its two halves in the split form ``(features, head)``."""
    return tuple(model) if isinstance(model, (tuple, list)) else (model,)


def _is_numpy(model: Any, inputs: Any) -> bool:
    from gradcam_ref.backends import numpy_backend  # NumPy only: always cheap to import

    return isinstance(model, numpy_backend.Oracle)


def _is_torch(model: Any, inputs: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and all(isinstance(p, torch.nn.Module) for p in _parts(model))


def _is_jax(model: Any, inputs: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(inputs, jax.Array)


_DETECTORS = {"numpy": _is_numpy, "torch": _is_torch, "jax": _is_jax}
