r"""The TensorFlow backend: Grad-CAM of Keras 3 models at a named layer, and of TF callables ``(features, head)``.

The design (the full account, with examples: docs/backends.md, "TensorFlow and Keras"): the
model is split at ``layer`` from its own graph (``_split``: nothing of it changed; the last
``CACHED`` (model, layer) pairs kept); the part before the layer runs with no tape;
``tf.GradientTape`` watches A only and records the head; ``(N, T)`` targets are one vectorised
pull-back, started at the kernel's columns when the output is a linear ``Dense`` (``_program``).
Both run as one ``tf.function`` (``compiled=True``), called through its concrete function, with
the core's Eq. 1-2 inside (:mod:`gradcam_ref._tf_array_api`). Keras is channels-last: A comes
back channels-first, ``(N, K, *spatial)`` (``channel_axis=-1``). This module holds the
Protocol's surface and the checks of the arguments.

The model is called with ``training=False``; ``guided=True`` runs one more pass with guided ReLUs
(:mod:`~gradcam_ref.backends.tensorflow.guided`); :func:`perturb` re-scores perturbed copies
(Score-CAM: inputs through the model; Ablation-CAM: A through ``head``). Inputs are checked
against the model's input shape and for NaN/Inf; a softmax output warns
(:class:`ProbabilityScoresWarning`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradcam_ref.backends._contract import (
    Capture,
    Explanation,
    GradCamFields,
    Perturbed,
    ProbabilityScoresWarning,
    arguments_of,
    check_feature_maps,
    check_finite,
    check_same_batch,
    check_scores,
    check_target_scores,
    check_where,
    class_indices,
    grad_cam_fields,
    guided_grad_cam,
    perturb_chunks,
    resolve_targets,
    same_parameters,
    shape_of,
    warn_zero_gradients,
)
from gradcam_ref.backends.tensorflow import _program, _split
from gradcam_ref.backends.tensorflow import guided as tf_guided

# (duplicates pairs this header with the JAX backend's: the contract names both import and the
# Protocol's attributes, declarations that each backend states, not logic.)
NAME = "tensorflow"
GUIDED = True
DIFFERENTIABLE = False

__all__ = ["DIFFERENTIABLE", "GUIDED", "NAME", "capture", "explain", "perturb", "score"]


def capture(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    layer: str | keras.Layer | None = None,
    guided: bool = False,
    channel_axis: int = -1,
    compiled: bool = True,
) -> Capture:
    r"""Run ``model`` on ``inputs``; return :math:`A`, :math:`\partial y^c/\partial A` and y at ``layer``.

    Args:
      model: a functional or sequential ``keras.Model`` (built) returning ``(N, C)`` scores, or a
        ``(features, head)`` pair of TF callables with scores ``head(features(inputs))``.
      inputs: one batch ``(N, ...)``: a ``tf.Tensor`` or a NumPy array, of the model's input shape, finite.
      target: None | int | N ints | int array ``(N, T)`` | callable ``scores -> (N,)`` (traced
        into the compiled program: pass the same function object to reuse it).
      layer: a layer name (or the ``keras.Layer``) of ``model``; None in the split form.
      guided: also compute ``guided_backprop``, the input gradient through guided ReLUs.
      channel_axis: the axis of A holding its K channels: -1 (Keras' channels-last) or 1.
      compiled: run the forward and backward passes as one ``tf.function``.

    Returns:
      ``Capture`` of ``tf.Tensor``\ s: ``activations`` ``(N, K, *spatial)`` and ``gradients``
      (``(N, T, K, *spatial)`` for ``(N, T)`` targets) channels-first; ``scores`` as the model
      returns them; ``targets`` int64 NumPy (None for a callable); ``guided_backprop`` of the
      inputs' shape with their channels moved like A's (``(N, C, *S)``, or ``(N, T, C, *S)``), or None.
    """
    return _capture(model, inputs, target, layer, guided, channel_axis, compiled, with_fields=False)[0]


def _capture(model: Any, inputs: Any, target: Any, layer: Any, guided: bool, channel_axis: int, compiled: bool,
             *, with_fields: bool) -> tuple[Capture, GradCamFields | None, Any]:
    """:func:`capture`; with ``with_fields``, also the core's ``grad_cam_fields`` computed inside the
    program and whether they are all finite (a boolean tensor)."""
    x = _as_inputs(inputs)
    program, where = _split.program_for(model, layer)
    _check_input_shape(x, program)
    axis = _channel_axis(channel_axis)
    n = int(x.shape[0])
    if callable(target):
        kind: Any = target
        indices = None
    elif target is None:
        kind, indices = "argmax", None
    else:  # checked now for everything but the range, which needs the scores (checked after the run)
        proxy = _ShapeOnly((n, np.iinfo(np.int64).max))
        try:
            checked = class_indices(target, proxy)
        except ValueError as error:
            if not str(error).startswith("target out of range"):
                raise
            checked = class_indices(np.abs(np.asarray(target)), proxy)  # negative: refused after the run
        kind, indices = ("multi" if checked.ndim == 2 else "single"), tf.convert_to_tensor(checked)
    if program.probabilities is not None and not callable(target):
        warnings.warn(program.probabilities, ProbabilityScoresWarning, stacklevel=3)
    if not compiled:  # eagerly the core inside the program would name the activations first
        _check_finite_inputs(x)
    run = program.get(kind, compiled, axis, with_fields, len(x.shape))
    a, g, scores, chosen, y, cleared, fields, finite, x_finite = run(x, indices)
    if x_finite is not None and not bool(x_finite):
        _check_finite_inputs(x)
    _check_captured(a, scores, x, where)
    if callable(target):
        check_target_scores(_host_proxy(y), n)
        targets_out = None
    elif target is None:
        check_scores(scores)
        targets_out = chosen.numpy().astype(np.int64)
    else:
        targets_out = resolve_targets(target, scores)  # the range, against the real C
    if g is None:
        raise ValueError(f"the score does not depend on {where}: no autograd path from it to the score")
    activations, gradients = a, g  # moved channels-first inside the program
    check_feature_maps("activations", activations)
    _warn_zero_gradients(gradients, len(gradients.shape) - len(activations.shape) + 1, cleared, where)
    guided_backprop = None
    if guided:
        if len(x.shape) != len(activations.shape) and axis != 1:
            raise ValueError(
                f"guided=True with channel_axis={channel_axis}: the inputs are taken to have their "
                f"channels on that axis too, so they must have the rank of the activations; got "
                f"inputs {shape_of(x)}"
            )
        gb = tf_guided.guided_backprop(program.guided, program.whole, x, target if callable(target) else targets_out)
        guided_backprop = _program.channels_first(gb, axis, 2 if len(gb.shape) == len(x.shape) + 1 else 1)
    return Capture(activations, gradients, scores, targets_out, guided_backprop), fields, finite


@same_parameters(capture)
def explain(*args: Any, **kwargs: Any) -> Explanation:
    """The :class:`~gradcam_ref.Explanation` of :func:`capture`: the core's math on its arrays, as tensors.

    Eq. 1 and Eq. 2 are the core's :func:`~gradcam_ref.backends._contract.grad_cam_fields`, run on
    the tensors inside the compiled program (``gradcam_ref._tf_array_api``: no host copies), in the
    activations' dtype. Should a value come out non-finite, the core runs again outside the program
    (its overflow-safe mean) and its checks name the culprit. Guided Grad-CAM is the core's too.
    """
    captured, fields, finite = _capture(**arguments_of(explain, args, kwargs), with_fields=True)
    if fields is None or not bool(finite):
        fields = grad_cam_fields(captured._replace(guided_backprop=None))
        check_finite(fields.weights, "grad_cam", gradients=captured.gradients)
        check_finite(fields.signed, "grad_cam", activations=captured.activations, gradients=captured.gradients)
    if captured.guided_backprop is not None:
        fields = fields._replace(guided_grad_cam=guided_grad_cam(
            captured.guided_backprop, fields.maps, spatial_rank=len(captured.activations.shape) - 2))
    return Explanation.from_capture(captured, fields)


def _warn_zero_gradients(g: tf.Tensor, lead: int, cleared: tf.Tensor | None, where: str) -> None:
    """Warn about examples (and targets) whose gradients ``g`` are zero everywhere (``g.shape[:lead]``).

    ``cleared`` (computed in the program from Eq. 1's weights, the spatial means of ``g``): True
    where a row of weights has a non-zero value, which needs a non-zero gradient. ``g`` itself is
    searched, by a max and a min (no temporary of its size, as ``abs`` would make), only when some
    row is not cleared or the weights are unknown.
    """
    if cleared is not None and bool(np.all(cleared.numpy())):
        return
    axes = list(range(lead, len(g.shape)))
    zero = tf.equal(tf.reduce_max(g, axis=axes), 0) & tf.equal(tf.reduce_min(g, axis=axes), 0)
    warn_zero_gradients(zero.numpy(), where, stacklevel=4)


class _ShapeOnly:
    """Stands in for the scores where only their shape is read (the target parser's checks)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _host_proxy(y: Any) -> Any:
    """``y`` as NumPy, for the shared message of check_target_scores (array-api-compat has no TF)."""
    return y.numpy() if isinstance(y, tf.Tensor) else y


def score(model: Any, inputs: Any) -> tf.Tensor:
    """The scores ``(N, classes)`` of a Keras model (``training=False``) or of ``head(features(x))``."""
    x = _as_inputs(inputs)
    if isinstance(model, (tuple, list)):
        features, head = _split.split_form(model, None)
        out = head(features(x))
    elif isinstance(model, keras.Model):
        out = model(x, training=False)
    else:
        raise TypeError(
            f"model must be a keras.Model or a (features, head) pair of TF callables, got {type(model).__name__}"
        )
    check_scores(out)
    return out


def perturb(
    model: Any,
    inputs: Any,
    make: Callable[..., Any],
    *,
    layer: str | keras.Layer | None = None,
    where: str = "activations",
    batch_size: int = 32,
    count: Callable[[Any, int], int] | None = None,
    channel_axis: int = -1,
    compiled: bool = True,
    scored: Callable[[Any], Any] | None = None,
) -> Perturbed:
    """Score perturbed copies of each example without a tape (the Protocol's ``perturb``).

    One forward pass of ``features`` gives A (and the tensors that skip over the layer) and
    ``head`` the scores. ``where="activations"`` then runs only ``head`` (the Keras model's part
    after the layer, built from its graph as in :func:`capture`, or the split form's ``head``) on
    each batch of perturbed activations, with the skipping tensors of the example repeated;
    ``where="inputs"`` runs the whole model. Batches are scored by one ``tf.function`` per
    (model, layer, where) (``compiled=True``), ``batch_size`` rows each (the last one padded).

    ``make`` (a core function, running on the tensors through :mod:`gradcam_ref._tf_array_api`)
    gets A channels-first ``(N, K, *spatial)`` and, with ``channel_axis=-1``, the inputs with their
    channels moved like A's (as ``guided=True`` takes them); its batches are moved back. With
    ``where="inputs"`` both come in the dtype the model casts its inputs to (a Keras model's
    floating Input dtype, else the inputs' if floating, else A's): float64 NumPy inputs, uint8
    images and a mixed-precision A meet the masks in one dtype. With
    ``count``, example n gets ``count(A, n)`` copies and NaN rows after them (the Protocol's). Returns
    ``Perturbed`` of tensors: A (channels-first), the scores and ``(N, K, C)`` perturbed scores.
    """
    check_where(where)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x = _as_inputs(inputs)
    program, where_name = _split.program_for(model, layer)
    _check_input_shape(x, program)
    _check_finite_inputs(x)
    axis = _channel_axis(channel_axis)
    parts = program.features(x)
    a, rest = (parts[0], list(parts[1:])) if isinstance(parts, (list, tuple)) else (parts, [])
    if not isinstance(a, tf.Tensor) or not a.dtype.is_floating:
        got = f"a {a.dtype.name} tensor" if isinstance(a, tf.Tensor) else type(a).__name__
        raise TypeError(f"{where_name} must be one floating-point tensor (N, *spatial, K), got {got}")
    scores = program.head([a, *rest]) if rest else program.head(a)
    if not isinstance(scores, tf.Tensor):
        raise TypeError(f"the model must return one tensor of scores, got {type(scores).__name__}")
    _check_captured(a, scores, x, where_name)
    check_scores(scores)
    activations = _program.channels_first(a, axis, 1)
    check_feature_maps("activations", activations)
    if where == "inputs" and axis == -1 and len(x.shape) != len(a.shape):
        raise ValueError(
            f"where='inputs' with channel_axis={channel_axis}: the inputs are taken to have their channels "
            f"on that axis too, so they must have the rank of the activations; got inputs {shape_of(x)}"
        )
    x_first, masked = x, activations
    if where == "inputs":  # the core multiplies them: one dtype, the inputs' as the model takes them
        dtype = _model_input_dtype(x, a, program)
        x_first, masked = tf.cast(_program.channels_first(x, axis, 1), dtype), tf.cast(activations, dtype)
    score_batch = program.perturbed(where, compiled)
    n, k = (int(d) for d in activations.shape[:2])
    if scored is not None:
        scored(scores)
    rows = []
    for i, copies, spans in perturb_chunks(activations, batch_size, count):
        skipping = [tf.repeat(r[i:i + 1], batch_size, axis=0) for r in rest]
        for start, stop in spans:
            batch = make(x_first, masked, i, start, stop)
            if not isinstance(batch, tf.Tensor) or int(batch.shape[0]) != stop - start:
                raise ValueError(f"make must return a tensor of {stop - start} perturbed copies, got "
                                 f"{type(batch).__name__} {shape_of(batch)}")
            if axis == -1:
                batch = _program.channels_last(batch)
            if stop - start < batch_size:  # one traced shape for every batch
                batch = tf.concat([batch, tf.zeros((batch_size - (stop - start), *batch.shape[1:]), batch.dtype)], 0)
            rows.append(score_batch(batch, skipping)[: stop - start])
        if copies < k:  # the rows no copy was asked for
            rows.append(tf.fill((k - copies, *scores.shape[1:]), tf.constant(np.nan, scores.dtype)))
    perturbed = tf.reshape(tf.concat(rows, axis=0), (n, k, *scores.shape[1:]))
    return Perturbed(activations, scores, perturbed)


def _as_inputs(inputs: Any) -> tf.Tensor:
    if isinstance(inputs, tf.Variable):
        inputs = tf.convert_to_tensor(inputs)
    if isinstance(inputs, np.ndarray):
        inputs = tf.convert_to_tensor(inputs)
    if not isinstance(inputs, tf.Tensor):
        raise TypeError(f"inputs must be a tf.Tensor or a NumPy array (N, ...), got {type(inputs).__name__}")
    if inputs.shape.rank is None or inputs.shape.rank < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {shape_of(inputs)}")
    return inputs


def _model_input_dtype(x: tf.Tensor, a: tf.Tensor, program: _program.Program) -> tf.DType:
    """The floating dtype the model takes ``x`` in: its Keras Input's (to which Keras casts), else
    that of ``x``, else (integer inputs to a split form) that of A."""
    for dtype in (program.input_dtype, x.dtype):
        if dtype is not None and dtype.is_floating:
            return dtype
    return a.dtype


def _check_input_shape(x: tf.Tensor, program: _program.Program) -> None:
    """Refuse inputs that the Keras model's input shape does not admit (a missing batch axis)."""
    if program.expected is None:
        return
    name, expected = program.expected
    shape = x.shape
    if len(shape) == len(expected) and all(e is None or e == d for e, d in zip(expected, shape, strict=True)):
        return
    want = ", ".join(["N" if expected[0] is None else str(expected[0]), *map(str, expected[1:])])
    raise ValueError(f"inputs must have shape ({want}), the input shape of model {name!r}, got shape {shape_of(x)}")


def _check_finite_inputs(x: tf.Tensor) -> None:
    """Refuse NaN or Inf inputs: TF's compiled kernels may make a number of a NaN (a fused ReLU)."""
    if not x.dtype.is_floating:
        return
    bad = int(tf.reduce_sum(tf.cast(~tf.math.is_finite(x), tf.int64)))
    if bad:
        raise ValueError(
            f"inputs contains NaN or Inf ({bad} of {int(tf.size(x))} values); the tensorflow backend needs "
            "finite inputs (its compiled kernels may turn a NaN into a number, and the maps would look valid)"
        )


def _check_captured(a: tf.Tensor, scores: tf.Tensor, x: tf.Tensor, where: str) -> None:
    check_same_batch(a, scores, x, where, "(N, *spatial, K)")


def _channel_axis(channel_axis: int) -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
    if channel_axis not in (1, -1):
        raise ValueError(f"channel_axis must be -1 (channels-last, Keras' default) or 1 (channels-first), "
                         f"got {channel_axis}")
    return int(channel_axis)

