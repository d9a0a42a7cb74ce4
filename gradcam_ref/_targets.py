"""What ``target`` means, for every backend: one parser, one set of error messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradcam_ref._arrays import Array, is_array, namespace, shape_of, to_numpy

Target = Any
"""``None`` | int | sequence of N ints | int array ``(N, T)`` | callable ``scores -> (N,)``."""


def resolve_targets(target: Target, scores: Array) -> np.ndarray | Callable[[Array], Array]:
    """Turn ``target`` into class indices for the ``(N, C)`` ``scores``, or keep a callable.

    - ``None``: the predicted class of each example, ``argmax(scores, axis=1)``, shape ``(N,)``;
    - an int c: class c for every example, shape ``(N,)``;
    - a sequence or 1-D array of N ints: one class per example, shape ``(N,)``;
    - an int array ``(N, T)``: T classes per example, shape ``(N, T)`` (T maps per example);
    - a callable: returned unchanged; the backend differentiates ``target(scores)``, which must
      return shape ``(N,)`` (one differentiable score per example).

    Returns:
      An int64 NumPy array ``(N,)`` or ``(N, T)`` (host memory: N*T small ints), or the callable.
    """
    if callable(target):
        return target
    return class_indices(target, scores)


def class_indices(target: Target, scores: Array) -> np.ndarray:
    """:func:`resolve_targets` for every target but a callable: int64 ``(N,)`` or ``(N, T)``."""
    if callable(target):
        raise TypeError("target is a callable; class_indices needs None, an int, N ints or an (N, T) int array")
    check_scores(scores)
    n, c = shape_of(scores)
    if target is None:
        xp = namespace(scores)
        return to_numpy(xp.argmax(scores, axis=1)).astype(np.int64)
    if isinstance(target, (bool, np.bool_)):
        raise TypeError(
            f"target must be None, an int, N ints, an (N, T) int array or a callable, got {target!r}"
        )
    if isinstance(target, (int, np.integer)):
        if not 0 <= target < c:
            _check_range(np.asarray([int(target)], dtype=object), c)  # any Python int, however large
        return np.full((n,), int(target), dtype=np.int64)
    indices = _as_index_array(target)
    if indices.ndim == 0:
        _check_range(indices[None], c)
        return np.full((n,), int(indices), dtype=np.int64)
    if indices.ndim > 2 or indices.shape[0] != n or 0 in indices.shape:
        raise ValueError(
            f"target must be an int, a sequence of N = {n} ints or an (N, T) = ({n}, T) "
            f"int array, got shape {indices.shape}"
        )
    _check_range(indices, c)
    return indices.astype(np.int64)


def _check_range(indices: np.ndarray, c: int) -> None:
    """Refuse indices outside ``[0, C)``, shown as the user gave them (before any cast to int64).

    Two reductions decide (half the operations of a mask, on every call; Python's own ``min`` and
    ``max`` of the values for a few of them, cheaper than NumPy's); the mask is built only for
    the message.
    """
    if indices.size <= 64:
        values = indices.ravel().tolist()
        if min(values) >= 0 and max(values) < c:
            return
    elif indices.min() >= 0 and indices.max() < c:
        return
    bad = (indices < 0) | (indices >= c)
    if bad.any():
        raise ValueError(
            f"target out of range: the scores have C = {c} classes, so targets must lie in "
            f"[0, {c - 1}], got {[int(v) for v in indices[bad][:5]]}"
        )


def check_scores(scores: Array) -> None:
    """The model's output must be ``(N, C)`` scores for class-index targets."""
    shape = shape_of(scores)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(
            f"the model's output (scores) must have shape (N, C) for class-index targets, "
            f"got shape {shape}; pass a callable target that reduces it to (N,)"
        )


def check_same_batch(activations: Array, scores: Array, inputs: Array, where: str, layout: str) -> None:
    """A captured layer and the model's output must both be batches of the inputs' N examples.

    ``where`` names the layer in the message; ``layout`` is the backend's, e.g. ``(N, K, *spatial)``.
    """
    n, a = shape_of(inputs)[0], shape_of(activations)
    if len(a) < 2 or a[0] != n:
        raise ValueError(
            f"{where} has shape {a}, which is not a batch of N = {n} examples like inputs "
            f"{shape_of(inputs)}: Grad-CAM needs activations {layout}; check the rank of inputs "
            "(a batch axis first)"
        )
    s = shape_of(scores)
    if len(s) < 1 or s[0] != n:
        raise ValueError(
            f"the model's output has shape {s}, not a batch of N = {n} examples like inputs {shape_of(inputs)}"
        )


def check_target_scores(y: Array, n: int, scores: Array | None = None) -> None:
    """A callable target's output must be one floating score per example, shape ``(N,)``, and
    (given ``scores``) an array of the scores' library: computed from them, it carries their graph."""
    shape = shape_of(y) if hasattr(y, "shape") else None
    floating = shape is not None and is_array(y) and \
        namespace(y).isdtype(y.dtype, "real floating")
    if shape != (n,) or not floating:
        got = f"shape {shape} {y.dtype}" if shape is not None else type(y).__name__
        raise ValueError(
            f"a callable target must return one floating score per example, shape (N,) = ({n},), got {got}"
        )
    if scores is not None and namespace(y) is not namespace(scores):
        raise TypeError(
            f"a callable target must return an array of the scores' library ({type(scores).__module__}."
            f"{type(scores).__name__}) computed from them, got {type(y).__module__}.{type(y).__name__}"
        )


def _as_index_array(target: Target) -> np.ndarray:
    """``target`` as a NumPy int array of its own integer dtype (uint64 stays uint64), or raise.

    Python ints beyond int64 become an object array of ints, so that the range check can show
    them as they are.
    """
    try:
        indices = target if type(target) is np.ndarray else to_numpy(target) if is_array(target) else np.asarray(target)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"target must be ints, got {target!r}") from None
    if indices.size == 0:
        raise ValueError(
            f"target must be an int, N ints or an (N, T) int array, got an empty one (shape {indices.shape})"
        )
    if indices.dtype.kind == "O" and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in indices.flat
    ):
        return indices  # ints too large for int64: out of range, which the caller reports
    if indices.dtype.kind not in "iu":
        raise TypeError(f"target must hold integers (class indices), got dtype {indices.dtype}")
    return indices
