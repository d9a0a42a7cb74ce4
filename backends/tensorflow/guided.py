r"""Guided backpropagation in TensorFlow: every ``Relu`` and ``Relu6`` op of the model gets the guided rule.

The model runs inside a ``tf.function`` under ``graph.gradient_override_map``, which tags each
``Relu`` and ``Relu6`` op it creates with a registered gradient; ``tf.gradients`` of the score
w.r.t. the input then passes the gradient g arriving at such an op with output y back as
:math:`g \cdot [0 < y < b] \cdot [g > 0]` (b = 6 for ``Relu6``, :math:`\infty` for ``Relu``;
Springenberg et al. 2015, arXiv 1412.6806), the rule of the torch and JAX backends. Everything
else keeps its ordinary gradient; the forward numbers are unchanged, and nothing global is
modified (the tags live in the traced graph only).

Recognised: whatever emits a ``Relu``/``Relu6`` op: ``tf.nn.relu``, ``tf.nn.relu6``, Keras'
``activation="relu"``, ``keras.layers.ReLU()`` (``max_value=6``: ``Relu6``; another cap: ``Relu``
then ``Minimum``, whose ordinary gradient gives the capped rule), ``keras.activations.relu``.
Not recognised (ordinary derivative, and :class:`NoGuidedReLUWarning` when no ReLU at all is
found): ReLUs written as ``tf.maximum(x, 0)`` or ``tf.clip_by_value``, leaky ReLUs, and ReLUs
inside a nested ``tf.function`` (its ops live in another graph).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from gradcam_ref.backends._contract import NoGuidedReLUWarning

__all__ = ["GUIDED_OPS", "guided_backprop", "guided_gradients"]

GUIDED_OPS = {"Relu": "GradcamRefGuidedRelu", "Relu6": "GradcamRefGuidedRelu6"}
"""The op types guided, and the registered gradient each one gets."""

_LOOKALIKES = ("Maximum", "ClipByValue", "LeakyRelu")


def _guided_relu(op: Any, g: tf.Tensor) -> tf.Tensor:
    keep = (op.outputs[0] > 0) & (g > 0)
    return tf.where(keep, g, tf.zeros_like(g))


def _guided_relu6(op: Any, g: tf.Tensor) -> tf.Tensor:
    y = op.outputs[0]
    keep = (y > 0) & (y < 6) & (g > 0)
    return tf.where(keep, g, tf.zeros_like(g))


def _register(name: str, gradient: Any) -> None:
    """``tf.RegisterGradient(name)(gradient)``, once per process: TensorFlow refuses a second
    registration, which a second import of this module (a reload, a test runner importing the
    source tree under another name) would otherwise make."""
    try:
        tf.RegisterGradient(name)(gradient)
    except KeyError:  # already registered by an earlier import of this module: the same rule
        pass


_register(GUIDED_OPS["Relu"], _guided_relu)
_register(GUIDED_OPS["Relu6"], _guided_relu6)


class _Record:
    """What the last trace found: guided op counts, and ReLU look-alikes left unguided."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lookalikes: collections.Counter[str] = collections.Counter()


def guided_gradients(whole: Callable[[tf.Tensor], tf.Tensor], kind: Any) -> tuple[Callable, _Record]:
    """A ``tf.function`` ``(x, indices) -> guided d score / d x`` and the record of its traces.

    ``kind``: ``"single"`` (``indices`` ``(N,)``), ``"multi"`` (``(N, T)``: T gradients stacked on
    axis 1) or a callable ``scores -> (N,)`` (``indices`` None).
    """
    record = _Record()

    def run(x: tf.Tensor, indices: Any) -> tf.Tensor:
        graph = tf.compat.v1.get_default_graph()
        with graph.gradient_override_map(GUIDED_OPS):
            scores = whole(x)
        types = [op.type for op in graph.get_operations()]
        record.counts = collections.Counter(t for t in types if t in GUIDED_OPS)
        record.lookalikes = collections.Counter(t for t in types if t in _LOOKALIKES)
        if callable(kind):
            return _grad(kind(scores), x)
        if kind == "multi":
            return tf.stack([_grad(tf.gather(scores, indices[:, t], batch_dims=1), x)
                             for t in range(int(indices.shape[1]))], axis=1)
        return _grad(tf.gather(scores, indices, batch_dims=1), x)

    return tf.function(run, reduce_retracing=True), record


def _grad(y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    (g,) = tf.gradients(y, x)
    return tf.zeros_like(x) if g is None else g


def guided_backprop(cache: dict[Any, Any], whole: Callable, x: tf.Tensor, targets: Any) -> tf.Tensor:
    r""":math:`\partial^{\text{guided}} y^c / \partial x`, ``(N, *x)`` or ``(N, T, *x)``, for resolved ``targets``.

    ``targets`` are the Grad-CAM pass's: an int64 array ``(N,)`` or ``(N, T)``, or the callable.
    ``cache`` keeps the traced function per target kind (the caller's, one per model and layer).
    """
    if not x.dtype.is_floating:
        raise TypeError(f"guided=True differentiates w.r.t. the inputs, which must be floating, got {x.dtype.name}")
    if callable(targets):
        kind, indices = targets, None
    else:
        indices = tf.convert_to_tensor(np.asarray(targets, dtype=np.int64))
        kind = "multi" if indices.shape.rank == 2 else "single"
    # one function per rank of the inputs (a signature relaxed to an unknown rank could abort in a
    # kernel) and per T (the T gradients are unrolled: a relaxed T is unknown)
    t = int(indices.shape[1]) if indices is not None and indices.shape.rank == 2 else None
    key = (("fn", id(kind), kind) if callable(kind) else kind, x.shape.rank, t)
    if key not in cache:
        cache[key] = guided_gradients(whole, kind)
    fn, record = cache[key]
    out = fn(x, indices)
    if not record.counts:
        seen = f" (it has {dict(record.lookalikes)} ops, which keep their ordinary derivative)" \
            if record.lookalikes else ""
        warnings.warn(
            "guided=True but the model has no Relu or Relu6 op that the guided pass recognises"
            f"{seen} (see gradcam_ref.backends.tensorflow.guided): guided_backprop is the plain "
            "gradient w.r.t. the inputs",
            NoGuidedReLUWarning,
            stacklevel=4,
        )
    return out
