r"""The JAX backend: Grad-CAM of a model split as ``(features, head)``, as one compiled program.

For inputs ``x`` ``(N, ...)`` one ``jax.jit`` program runs::

    A = features(x)                       (N, K, *spatial), channels on ``channel_axis``
    scores, vjp = jax.vjp(head, A)        y, pre-softmax
    dy^c/dA = vjp(one_hot(c))             one pull-back for N targets; jax.vmap over T targets
    the core's grad_cam_fields            Eq. 1, Eq. 2, Guided Grad-CAM, inside the program

compiled once per ``(features, head, target callable, channel_axis, guided)`` and input shape.
:func:`capture` and :func:`explain` both run that program (``_program``). The maps are
differentiable (``jax.grad`` through the backward pass). Guided backpropagation re-interprets
the jaxpr of ``head(features(x))`` (:mod:`gradcam_ref.backends.jax.guided`). Splitting Flax,
Equinox or Haiku models, and the rest of the story: docs/backends.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcam_ref.backends._contract import (
    Capture,
    Explanation,
    GradCamFields,
    NoGuidedReLUWarning,
    Perturbed,
    check_feature_maps,
    check_finite,
    check_scores,
    check_target_scores,
    class_indices,
    grad_cam_fields,
    shape_of,
)
from gradcam_ref.backends.jax import guided as jax_guided

NAME = "jax"
GUIDED = True

__all__ = ["GUIDED", "NAME", "capture", "explain", "perturb"]


def capture(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    layer: Any = None,
    guided: bool = False,
    channel_axis: int = 1,
) -> Capture:
    r"""A, dy/dA and the scores of ``model = (features, head)`` on ``inputs``, by one jitted program.

    Args:
      model: ``(features, head)``, two hashable JAX-traceable callables:
        ``features(inputs) -> A`` and ``head(A) -> scores``.
      inputs: the batch ``(N, ...)``, a ``jax.Array`` (NumPy arrays are converted).
      target: ``None`` (each example's predicted class), an int, N ints, an int array ``(N, T)``
        (T maps per example) or a callable ``scores -> (N,)``. A traced int array (inside an
        outer ``jax.jit``) is accepted; its range cannot be checked before it runs, and an index
        outside ``[0, C)`` then gives a zero gradient (JAX's ``one_hot`` convention).
      layer: must be None: the layer is the seam of ``(features, head)``.
      guided: also compute ``guided_backprop``, the input gradient through guided ReLUs.
      channel_axis: the axis of ``A`` holding its K channels: 1 (channels-first) or, e.g., -1 for
        a channels-last (NHWC, Flax) model.

    Returns:
      JAX arrays on the default device, ``activations`` and ``gradients`` moved to channels-first
      ``(N, K, *spatial)`` (``(N, T, K, *spatial)`` for ``(N, T)`` targets). ``targets`` is an
      int64 NumPy array (None for a callable target), except when the call itself is traced (an
      outer ``jax.jit``, ``jax.grad``, ...) and the targets are the traced argmax or a traced
      argument: then it is that JAX int array. ``guided_backprop`` is ``(N, C, *spatial)``
      (``(N, T, C, *spatial)``), channels-first like the activations, or None.
    """
    return _run(model, inputs, target, layer, guided, channel_axis)[0]


def explain(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    layer: Any = None,
    guided: bool = False,
    channel_axis: int = 1,
) -> Explanation:
    """The :class:`~gradcam_ref.Explanation` of :func:`capture`, its core math run inside the same program."""
    return Explanation.from_capture(*_run(model, inputs, target, layer, guided, channel_axis))


def _run(
    model: Any, inputs: Any, target: Any, layer: Any, guided: bool, channel_axis: int
) -> tuple[Capture, GradCamFields]:
    """Check the arguments (by name, before any trace), run the program, check its result."""
    features, head = _split(model, layer)
    x = inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)
    if x.ndim < 1:
        raise ValueError(f"inputs must have a batch axis, shape (N, ...), got shape {shape_of(x)}")
    static = {"features": features, "head": head, "channel_axis": channel_axis}
    # The forward pass's shapes, from an abstract trace (cached by jax.jit): A is checked inside it.
    a_struct, scores = _forward.eval_shape(x, **static)
    if callable(target):
        _check_hashable("target", target)
        indices, targets_out = None, None
    else:
        check_scores(scores)
        _check_same_batch("head(A)", scores, x)
        indices, targets_out = _class_indices(target, scores)
    guided = bool(guided)
    if guided and channel_axis != 1 and x.ndim != a_struct.ndim:
        raise ValueError(
            f"guided=True with channel_axis={channel_axis}: the inputs are taken to have their channels "
            f"on that axis too, so they must have the rank of the activations; got inputs {shape_of(x)}"
        )
    captured, fields, traced_targets, finite = _program(
        x, indices, target_fn=target if callable(target) else None, guided=guided, **static)
    if guided:
        _warn_unguided(_GUIDED_RECORDS.get((features, head, shape_of(x), jnp.dtype(x.dtype))))
    # Inside the program the core's finite checks see tracers and are skipped; the program
    # computes the flag instead (of the signed map: the ReLU turns NaN into 0). Only when it is
    # False do the core's checks run, for their messages naming the culprit.
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        check_finite(fields.weights, "grad_cam", gradients=captured.gradients)
        check_finite(fields.signed, "grad_cam", activations=captured.activations, gradients=captured.gradients)
    if targets_out is None and traced_targets is not None:
        targets_out = _host_ints(traced_targets)
    return captured._replace(targets=targets_out), fields


# --- The compiled program --------------------------------------------------------------------


def _features(x: jax.Array, features: Callable, channel_axis: int) -> jax.Array:
    """``features(x)``, checked at trace time before anything consumes it."""
    a = features(x)
    if not isinstance(a, jax.Array):
        raise TypeError(f"features(inputs) must return one array (the activations A), got {type(a).__name__}")
    rank = a.ndim
    if rank < 3:
        raise ValueError(
            f"features(inputs) must return activations of shape (N, K, *spatial) (channels on "
            f"channel_axis={channel_axis}) with at least one spatial axis, "
            f"got shape {shape_of(a)} (rank {rank})"
        )
    axis = _channel_axis(channel_axis, rank)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"features(inputs) must return floating activations, got dtype {a.dtype}")
    _check_same_batch("features(inputs)", a, x)
    check_feature_maps("features(inputs), channels first,", _moved_shape(a, axis))  # no empty axis
    return a


def _forward_impl(x: jax.Array, *, features: Callable, head: Callable, channel_axis: int) -> Any:
    a = _features(x, features, channel_axis)
    return a, head(a)


def _program_impl(
    x: jax.Array,
    indices: jax.Array | None,
    *,
    features: Callable,
    head: Callable,
    target_fn: Callable | None,
    channel_axis: int,
    guided: bool = False,
) -> tuple[Any, ...]:
    r"""Everything, traced once: forward, one backward per target, Eq. 1 and Eq. 2 (the core's).

    ``indices`` is None (use ``argmax(scores, 1)``), ``(N,)`` or ``(N, T)`` class indices; or
    ``target_fn`` maps scores to ``(N,)`` and the gradient is that of :math:`\sum_n`
    ``target_fn(scores)[n]``.
    """
    a = _features(x, features, channel_axis)
    scores, head_vjp = jax.vjp(head, a)
    multi = False
    if target_fn is not None:
        y, target_vjp = jax.vjp(target_fn, scores)
        check_target_scores(y, a.shape[0])
        (seeds,) = target_vjp(jnp.ones_like(y))  # d(sum_n y_n)/d scores, shape of scores
    else:
        if indices is None:
            indices = jnp.argmax(scores, axis=1)
        seeds = jax.nn.one_hot(indices, scores.shape[1], dtype=scores.dtype)  # (N, C) or (N, T, C)
        multi = indices.ndim == 2
    gradients = _pull_back(head_vjp, seeds, multi)
    axis = _channel_axis(channel_axis, a.ndim)
    a_first = jnp.moveaxis(a, axis, 1)
    g_first = jnp.moveaxis(gradients, axis + 1, 2) if multi else jnp.moveaxis(gradients, axis, 1)
    guided_backprop = None
    if guided:  # the same seeds, pulled back to x through head(features(x)) with guided ReLUs
        record = _GUIDED_RECORDS[(features, head, shape_of(x), jnp.dtype(x.dtype))] = jax_guided.Record()
        whole = jax_guided.guided(lambda v: head(features(v)), record)
        _, guided_vjp = jax.vjp(whole, x)
        guided_backprop = _pull_back(guided_vjp, seeds, multi)
        if axis != 1:  # the inputs' channels on the activations' axis: channels-first, like A
            guided_backprop = jnp.moveaxis(guided_backprop, axis + multi, 1 + multi)
    captured = Capture(a_first, g_first, scores, None, guided_backprop)
    fields = grad_cam_fields(captured)
    finite = jnp.all(jnp.isfinite(fields.weights)) & jnp.all(jnp.isfinite(fields.signed))
    return captured, fields, indices, finite


def _pull_back(vjp: Callable, seeds: jax.Array, multi: bool) -> jax.Array:
    """``vjp(seeds)``; for ``(N, T, C)`` seeds, T pull-backs in one (``vmap`` over the target axis)."""
    if multi:
        per_target = jax.vmap(lambda seed: vjp(seed)[0])(jnp.moveaxis(seeds, 1, 0))
        return jnp.moveaxis(per_target, 0, 1)  # (T, N, ...) -> (N, T, ...)
    (out,) = vjp(seeds)
    return out


_GUIDED_RECORDS: dict[tuple[Any, ...], jax_guided.Record] = {}
"""What the last trace of a guided program found, per (features, head, input shape, dtype)."""


def _warn_unguided(record: jax_guided.Record | None) -> None:
    if record is None:
        return
    if not record.counts:
        warnings.warn(
            "guided=True but head(features(x)) has no ReLU that the guided pass recognises (see "
            "gradcam_ref.backends.jax.guided): guided_backprop is the plain gradient w.r.t. the inputs",
            NoGuidedReLUWarning,
            stacklevel=4,
        )
    if record.unguided:
        warnings.warn(
            f"guided=True: ReLU-like operations inside {sorted(set(record.unguided))} keep their "
            "ordinary derivative (see gradcam_ref.backends.jax.guided)",
            NoGuidedReLUWarning,
            stacklevel=4,
        )


_forward = jax.jit(_forward_impl, static_argnames=("features", "head", "channel_axis"))
_program = jax.jit(_program_impl, static_argnames=("features", "head", "target_fn", "channel_axis", "guided"))


# --- Re-scoring perturbed copies (Score-CAM, Ablation-CAM) ---------------------------------


def perturb(
    model: Any,
    inputs: Any,
    make: Callable[..., Any],
    *,
    layer: Any = None,
    where: str = "activations",
    batch_size: int = 32,
    channel_axis: int = 1,
) -> Perturbed:
    """Score perturbed copies of each example (the Protocol's ``perturb``), jitted per batch shape.

    ``where="activations"``: only ``head`` runs on the perturbed activations (moved back to
    ``channel_axis``); ``where="inputs"``: ``head(features(.))``. Every batch is padded to
    ``batch_size`` rows, so one compiled program scores them all.
    """
    if where not in ("activations", "inputs"):
        raise ValueError(f"where must be 'activations' or 'inputs', got {where!r}")
    features, head = _split(model, layer)
    x = inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)
    a_raw, scores = _forward(x, features=features, head=head, channel_axis=channel_axis)
    axis = _channel_axis(channel_axis, a_raw.ndim)
    a = jnp.moveaxis(a_raw, axis, 1)
    n, k = int(a.shape[0]), int(a.shape[1])
    score = _score_activations if where == "activations" else _score_inputs
    rows = []
    for i in range(n):
        for start in range(0, k, batch_size):
            stop = min(start + batch_size, k)
            batch = make(x, a, i, start, stop)
            padded = jnp.concatenate([batch, jnp.zeros((batch_size - (stop - start), *batch.shape[1:]), batch.dtype)])
            rows.append(score(padded, features=features, head=head, axis=axis)[: stop - start])
    perturbed = jnp.concatenate(rows).reshape(n, k, *scores.shape[1:])
    return Perturbed(a, scores, perturbed)


def _score_activations_impl(batch: jax.Array, *, features: Callable, head: Callable, axis: int) -> Any:
    return head(jnp.moveaxis(batch, 1, axis))


def _score_inputs_impl(batch: jax.Array, *, features: Callable, head: Callable, axis: int) -> Any:
    return head(features(batch))


_score_activations = jax.jit(_score_activations_impl, static_argnames=("features", "head", "axis"))
_score_inputs = jax.jit(_score_inputs_impl, static_argnames=("features", "head", "axis"))


# --- Checks -----------------------------------------------------------------------------------


def _split(model: Any, layer: Any) -> tuple[Callable, Callable]:
    if layer is not None:
        raise ValueError(
            f"the jax backend takes the layer as the seam of model = (features, head); "
            f"layer must be None, got {layer!r}"
        )
    if not (isinstance(model, (tuple, list)) and len(model) == 2 and all(callable(p) for p in model)):
        raise TypeError(
            f"model must be a pair (features, head) of callables, features(x) -> A and "
            f"head(A) -> scores, got {type(model).__name__}"
        )
    features, head = model
    _check_hashable("features", features)
    _check_hashable("head", head)
    return features, head


def _check_hashable(name: str, fn: Callable) -> None:
    try:
        hash(fn)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (jax.jit caches the compiled program per function), "
            f"got an unhashable {type(fn).__name__}; wrap it once in a function"
        ) from None


def _channel_axis(channel_axis: int, rank: int) -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
    axis = int(channel_axis) + rank if channel_axis < 0 else int(channel_axis)
    if not 1 <= axis < rank:
        raise ValueError(
            f"channel_axis must name a non-batch axis of the activations (rank {rank}): "
            f"1..{rank - 1} or -{rank - 1}..-1, got {channel_axis}"
        )
    return axis


def _moved_shape(a: Any, axis: int) -> jax.ShapeDtypeStruct:
    shape = list(shape_of(a))
    shape.insert(1, shape.pop(axis))
    return jax.ShapeDtypeStruct(tuple(shape), a.dtype)


def _check_same_batch(what: str, out: Any, x: jax.Array) -> None:
    if shape_of(out)[0] != shape_of(x)[0]:
        raise ValueError(
            f"{what} must keep the batch axis first: inputs have N = {shape_of(x)[0]} examples, "
            f"got shape {shape_of(out)}"
        )


def _class_indices(target: Any, scores: jax.ShapeDtypeStruct) -> tuple[jax.Array | None, np.ndarray | None]:
    """``(indices for the program, targets for the Explanation)``; None, None for the argmax."""
    if target is None:
        return None, None
    if isinstance(target, jax.core.Tracer):  # traced labels: the shape is all that can be checked
        n = shape_of(scores)[0]
        if not jnp.issubdtype(target.dtype, jnp.integer) or target.ndim not in (1, 2) or target.shape[0] != n:
            raise ValueError(
                f"a traced target must be an int array of shape (N,) or (N, T) with N = {n}, "
                f"got {target.dtype} {shape_of(target)}"
            )
        return target, None
    # class_indices reads only the shape of the scores.
    indices = class_indices(target, scores)
    return jnp.asarray(indices.astype(np.int32)), indices


def _host_ints(indices: jax.Array) -> Any:
    if isinstance(indices, jax.core.Tracer):
        return indices
    return np.asarray(indices).astype(np.int64)

