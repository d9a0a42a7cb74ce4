r"""Guided backpropagation in TensorFlow: every ``Relu`` and ``Relu6`` op of the model gets the guided rule.

The model runs inside a ``tf.function`` under ``graph.gradient_override_map``, which tags each
``Relu`` and ``Relu6`` op it creates with a registered gradient; ``tf.gradients`` of the score
w.r.t. the input then passes the gradient g arriving at such an op with output y back as
:math:`g \cdot [0 < y < b] \cdot [g > 0]` (b = 6 for ``Relu6``, :math:`\infty` for ``Relu``;
Springenberg et al. 2015, arXiv 1412.6806), the rule of the torch and JAX backends. Everything
else keeps its ordinary gradient; the forward numbers are unchanged, and nothing global is
modified (the tags live in the traced graph only).

Recognised: whatever emits a ``Relu``/``Relu6`` op: ``tf.nn.relu``, ``tf.nn.relu6``, Keras'
``activation="relu"``, ``keras.layers.ReLU()`` (``max_value=6``: ``Relu6``; another cap b:
``Relu`` then ``Minimum`` with the constant b, which passes g strictly below b only, as
``Relu6`` does). Not recognised (ordinary derivative, and :class:`NoGuidedReLUWarning` when no
ReLU at all is found): ReLUs written as ``tf.maximum(x, 0)`` or ``tf.clip_by_value``, leaky
ReLUs (``LeakyRelu``, and Keras' ``ReLU(negative_slope=s)`` with a cap or a threshold: its
``Relu`` ops, ``positive(z) - s * relu(-z)``, keep their ordinary derivative), and ReLUs inside a
nested ``tf.function`` (its ops live in another graph).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from gradcam_ref.backends._contract import NoGuidedReLUWarning

__all__ = ["GUIDED_OPS", "guided_backprop", "guided_gradients"]

GUIDED_OPS = {"Relu": "GradcamRefGuidedRelu", "Relu6": "GradcamRefGuidedRelu6"}
"""The op types guided, and the registered gradient each one gets."""

CAP = "GradcamRefGuidedCap"
"""The gradient of the ``Minimum`` that caps a guided ``Relu`` at a constant."""

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


def _guided_cap(op: Any, g: tf.Tensor) -> tuple[tf.Tensor, None]:
    """``Minimum(relu(z), b)``: g where ``relu(z) < b`` (the ordinary gradient also passes it at b)."""
    y, b = op.inputs
    return tf.where(y < b, g, tf.zeros_like(g)), None


_register(GUIDED_OPS["Relu"], _guided_relu)
_register(GUIDED_OPS["Relu6"], _guided_relu6)
_register(CAP, _guided_cap)


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
        operations = graph.get_operations()
        leaky = _leaky_relus(operations)
        for op in leaky:  # back to their own gradient
            op._clear_attr("_gradient_op_type")
        for op in operations:
            if (op.type == "Minimum" and op.inputs[0].op.type == "Relu" and op.inputs[0].op not in leaky
                    and _constant(op.inputs[1]) and op.inputs[1].shape.rank == 0):
                op._set_attr("_gradient_op_type", attr_value_pb2.AttrValue(s=CAP.encode()))
        record.counts = collections.Counter(op.type for op in operations if op.type in GUIDED_OPS and op not in leaky)
        record.lookalikes = collections.Counter(op.type for op in operations if op.type in _LOOKALIKES)
        record.lookalikes.update({f"{t} of a leaky ReLU": n for t, n in collections.Counter(
            op.type for op in leaky).items()})
        if callable(kind):
            return _grad(kind(scores), x)
        if kind == "multi":
            return tf.stack([_grad(tf.gather(scores, indices[:, t], batch_dims=1), x)
                             for t in range(int(indices.shape[1]))], axis=1)
        return _grad(tf.gather(scores, indices, batch_dims=1), x)

    return tf.function(run, reduce_retracing=True), record


def _constant(t: tf.Tensor) -> bool:
    """Whether ``t`` is a constant of the graph, or its cast (Keras' cap in mixed precision)."""
    return t.op.type == "Const" or (t.op.type == "Cast" and t.op.inputs[0].op.type == "Const")


def _leaky_relus(operations: list[Any]) -> set[Any]:
    """The ``Relu``/``Relu6`` ops of Keras' leaky ReLUs ``positive(z) - s * relu(-z [+ t])`` (its
    ``ReLU(negative_slope=s)`` with a cap or a threshold): ``Sub(p, Mul(s, Relu(Neg(z) [+ t])))``,
    and the ``Relu``/``Relu6`` of z that ``p`` comes from (through the cap's ``Minimum``/``Maximum``)."""
    found = set()
    for op in operations:
        if op.type != "Sub" or op.inputs[1].op.type != "Mul":
            continue
        factors = [t.op for t in op.inputs[1].op.inputs]
        negative = next((f for f in factors if f.type == "Relu"), None)
        if negative is None or not any(f.type == "Const" for f in factors):
            continue
        inner = negative.inputs[0].op
        if inner.type == "AddV2":  # -z + t
            inner = next((t.op for t in inner.inputs if t.op.type == "Neg"), inner)
        if inner.type != "Neg":
            continue
        z = inner.inputs[0]
        found.add(negative)
        positive = op.inputs[0].op
        while positive.type in ("Minimum", "Maximum"):  # the cap
            positive = positive.inputs[0].op
        if positive.type in GUIDED_OPS and positive.inputs[0].name == z.name:
            found.add(positive)
    return found


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
