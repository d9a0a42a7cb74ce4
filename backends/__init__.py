"""Backends: framework adapters that run a model and capture what Grad-CAM needs at a layer.

Each backend (``numpy_backend``, ``torch``, ``jax``, ``tensorflow``) satisfies the Protocol
:class:`gradcam_ref.backends._contract.Backend`. A framework is imported only when its backend
is used: detection looks at the frameworks the caller has already imported (``sys.modules``),
as einops does, since a torch model cannot exist unless torch was imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from gradcam_ref.backends._contract import Backend

BACKENDS = ("numpy", "torch", "jax", "tensorflow")
_MODULES = {"numpy": "numpy_backend", "torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}

__all__ = ["BACKENDS", "Backend", "load", "select"]


def load(name: str) -> Backend:
    """The backend called ``name``; imports its framework."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module: Backend = importlib.import_module(f"{__name__}.{_MODULES[name]}")  # type: ignore[assignment]
    return module


def select(model: Any, inputs: Any, backend: str | None = None) -> Backend:
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
    numpy_backend = sys.modules.get(f"{__name__}.numpy_backend")  # an Oracle implies its module
    return numpy_backend is not None and isinstance(model, numpy_backend.Oracle)


def _is_torch(model: Any, inputs: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and all(isinstance(p, torch.nn.Module) for p in _parts(model))


def _is_jax(model: Any, inputs: Any) -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    if isinstance(inputs, jax.Array):
        return True
    from gradcam_ref.backends.jax import models  # imports jax only, which is imported already

    return models.is_model(model)  # a Flax (linen, NNX) or Equinox model, whatever the inputs


def _is_tensorflow(model: Any, inputs: Any) -> bool:
    """A Keras model on the TensorFlow backend, a ``tf.Module``, or TF tensors as inputs."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    if isinstance(inputs, (tf.Tensor, tf.Variable)):
        return True
    keras = sys.modules.get("keras")
    if keras is None or keras.backend.backend() != "tensorflow":
        return any(isinstance(p, tf.Module) for p in _parts(model))
    return any(isinstance(p, (tf.Module, keras.Layer)) for p in _parts(model))


_DETECTORS = {"numpy": _is_numpy, "torch": _is_torch, "jax": _is_jax, "tensorflow": _is_tensorflow}
