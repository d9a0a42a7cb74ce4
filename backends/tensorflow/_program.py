r"""The TensorFlow backend's program: A without a tape, the head on one, Eq. 1-2 inside, one ``tf.function``.

:class:`Program` holds ``features`` and ``head`` of one (model, layer) and, per kind of target,
the traced function that runs :func:`_forward_backward`: ``features`` with no tape, ``head`` on a
tape watching A only, and the pull-back of the one-hot seeds (started at the kernel's columns
when the output is a linear ``Dense``; one vectorised pull-back for ``(N, T)`` targets), with the
core's Eq. 1-2 (:mod:`gradcam_ref._tf_array_api`) on the result. :class:`_Dispatch` calls it
through the concrete function of the inputs' signature. Keras is channels-last:
:func:`channels_first` moves A's channels after N.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from gradcam_ref.backends._contract import (
    Capture,
    grad_cam_fields,
)


class Program:
    """``features``/``head`` of one (model, layer) and the traced functions per target kind.

    ``classifier``: ``(trunk, last, dense, pooled)`` when ``head`` ends in a linear
    ``keras.layers.Dense`` ``dense`` (``head = last(trunk(parts))``, ``last`` that one layer's
    call; ``pooled``: ``trunk`` is A's channels-last global average), else None. The traced
    functions are kept per rank of the inputs: a relaxed signature (``reduce_retracing``) then
    never forgets the rank (a kernel traced for an unknown rank may abort the process).

    ``watched``: the Keras layers with an ``activation`` (those of the model, nested ones
    included): the traced functions, ``classifier`` and ``probabilities`` hold the activations
    they had, and :meth:`edited` tells when one was set anew (keras.io's ``layer.activation =
    None``), for :func:`~gradcam_ref.backends.tensorflow._split.program_for` to build the program again.
    """

    def __init__(self, features: Callable, head: Callable, whole: Callable, where: str,
                 classifier: tuple[Callable, Callable, Any, bool] | None = None, *,
                 expected: tuple[str, tuple[int | None, ...]] | None = None,
                 input_dtype: tf.DType | None = None,
                 probabilities: str | None = None, watched: tuple[Any, ...] = ()) -> None:
        self.features, self.head, self.whole, self.where = features, head, whole, where
        self.classifier = classifier
        self.expected = expected  # (model name, its input's shape) of a one-input Keras model
        self.input_dtype = input_dtype  # the dtype a one-input Keras model casts its inputs to
        self.probabilities = probabilities  # the warning when the model's output is a softmax
        self.watched, self._activations = watched, _activations(watched)
        self._perturbed: dict[Any, Callable] = {}
        self._compiled = _Traced()  # by target kind (callable targets: the last TARGET_FUNCTIONS)
        self.guided = _Traced()  # the guided pass's traced functions, likewise

    def edited(self) -> bool:
        """Whether a watched layer's ``activation`` is another object than when this was built."""
        return _activations(self.watched) != self._activations

    def perturbed(self, where: str, compiled: bool) -> Callable:
        """``batch, skipping -> scores``: ``head([batch, *skipping])`` or the whole model on ``batch``."""

        def run(batch: tf.Tensor, skipping: list[tf.Tensor]) -> Any:
            if where == "inputs":
                return self.whole(batch)
            return self.head([batch, *skipping]) if skipping else self.head(batch)

        if not compiled:
            return run
        if where not in self._perturbed:
            self._perturbed[where] = tf.function(run, reduce_retracing=True)
        return self._perturbed[where]

    def get(self, kind: Any, compiled: bool, axis: int, with_fields: bool = False, rank: int = 0) -> Callable:
        def run(x: tf.Tensor, indices: tf.Tensor | None) -> tuple[Any, ...]:
            # compiled kernels may turn a NaN into a number (a fused ReLU): the inputs are checked here
            x_finite = tf.reduce_all(tf.math.is_finite(x)) if x.dtype.is_floating else None
            pooled = axis == -1 and self.classifier is not None and self.classifier[3] and not callable(kind)
            a, g, scores, chosen, y = _forward_backward(self.features, self.head, x, indices, kind, self.where,
                                                        self.classifier, pooled)
            if g is None:
                return a, g, scores, chosen, y, None, None, None, x_finite
            if pooled:  # g is already (N, K, *spatial) or (N, T, K, *spatial)
                a = channels_first(a, axis, 1)
            else:
                multi = len(g.shape) == len(a.shape) + 1  # g is (T, N, *A): one transpose to (N, T, K, *spatial)
                lead = 2 if multi else 1  # (N,) or (N, T) before A's axes
                a, g = channels_first(a, axis, 1), channels_first(g, axis, lead, swap=multi)
            fields = finite = None
            # known shapes only (reduce_retracing may relax them to None): else the core runs after the program
            if with_fields and a.dtype.is_floating and len(a.shape) >= 3 and g.shape.is_fully_defined():
                fields = grad_cam_fields(Capture(a, g, scores, None))
                finite = tf.reduce_all(tf.math.is_finite(fields.weights)) & tf.reduce_all(
                    tf.math.is_finite(fields.signed))
            cleared = None if fields is None else tf.reduce_any(tf.not_equal(fields.weights, 0), axis=-1)
            return a, g, scores, chosen, y, cleared, fields, finite, x_finite

        if not compiled:
            return run
        key = (("fn", id(kind), kind) if callable(kind) else kind, axis, with_fields, rank)
        if key not in self._compiled:
            # autograph off: the core's Python stays Python (its value checks see symbolic tensors and wait)
            self._compiled[key] = _Dispatch(tf.function(run, reduce_retracing=True, autograph=False))
        return self._compiled[key]


TARGET_FUNCTIONS = 16
"""How many callable targets (function objects) each program keeps traced functions for (as JAX's)."""


class _Traced(collections.OrderedDict):
    """Traced functions by key; those of callable targets (keys ``(("fn", id, f), ...)``) are the last
    :data:`TARGET_FUNCTIONS` used: a new lambda per call (per image, per class) would otherwise keep
    one traced function each (about 13 MB for MobileNetV2) for as long as the program."""

    @staticmethod
    def _of_function(key: Any) -> bool:
        return isinstance(key[0], tuple) and key[0][0] == "fn"

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if self._of_function(key):
            self.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if self._of_function(key):
            for old in [k for k in self if self._of_function(k)][:-TARGET_FUNCTIONS]:
                del self[old]


def _activations(layers: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(layer.activation for layer in layers)


class _Dispatch:
    """Calls a ``tf.function`` ``(x, indices)`` through the concrete function of their signature.

    ``tf.function`` finds the concrete function of each call by hashing the types of its
    arguments *and of every captured tensor* (one per weight: about 250 for EfficientNet-Lite0,
    0.6 ms of Python per call), and the concrete function's own call binds the arguments again
    and lists its captures again (0.2 ms). Here the signature is the arguments' dtypes and shapes,
    each looked up in ``tf.function``'s cache once (:data:`SIGNATURES` kept), so tracing and its
    relaxation (``reduce_retracing``) stay ``tf.function``'s; the call is ``_call_flat`` (TF's
    private entry point, pinned with TF in constraints.txt) on the tensors and the captures
    listed then. The captures are the weights' resource handles: new values assigned to the
    weights are read at each call, as by ``tf.function``.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        self._concrete: collections.OrderedDict[tuple[Any, ...], tuple[Any, list[Any]]] = collections.OrderedDict()

    def __call__(self, x: tf.Tensor, indices: tf.Tensor | None) -> Any:
        key = (x.dtype, x.shape) if indices is None else (x.dtype, x.shape, indices.dtype, indices.shape)
        entry = self._concrete.get(key)
        if entry is None:
            concrete = self.function.get_concrete_function(x, indices)
            entry = self._concrete[key] = (concrete, concrete.captured_inputs)
            while len(self._concrete) > SIGNATURES:
                self._concrete.popitem(last=False)
        concrete, captures = entry
        return concrete._call_flat([x] if indices is None else [x, indices], captures)


SIGNATURES = 8
"""How many input signatures (dtypes and shapes) each traced function keeps a concrete function for."""


def _forward_backward(features: Callable, head: Callable, x: tf.Tensor, indices: tf.Tensor | None, kind: Any,
                      where: str, classifier: tuple[Callable, Callable, Any, bool] | None = None,
                      pooled: bool = False) -> tuple[Any, ...]:
    r"""A = features(x) (no tape); scores = head(A) on a tape watching A; the pull-back of the seeds.

    With ``classifier = (trunk, last, dense)`` (``head`` ending in a linear Dense, class targets), the
    tape records ``h = trunk(A)`` only and the scores are ``last(h)`` after it: the pull-back of a
    one-hot seed :math:`e_c` through ``dense`` is :math:`W e_c`, the kernel's column c (a gather of
    K values, where the tape's gradient would multiply :math:`e_c^\top` by all of W), and it is the
    seed of ``h``'s pull-back to A. With ``pooled`` (``h`` is A's global average over its Z
    positions, channels-last), that pull-back is the seed spread evenly, :math:`\partial y^c /
    \partial A^k_{ij} = W_{kc} / Z`: TF's gradient of the mean (a tile, then a division by Z),
    written here as a division of the K values, then a broadcast, channels-first: g is returned
    ``(N, K, *spatial)`` or ``(N, T, K, *spatial)`` with no copy of it to transpose.
    """
    parts = features(x)
    a, rest = (parts[0], list(parts[1:])) if isinstance(parts, (list, tuple)) else (parts, [])
    if not isinstance(a, tf.Tensor) or not a.dtype.is_floating:
        got = f"a {a.dtype.name} tensor" if isinstance(a, tf.Tensor) else type(a).__name__
        raise TypeError(f"{where} must be one floating-point tensor (N, *spatial, K), got {got}")
    linear = classifier is not None and not callable(kind)
    with tf.GradientTape(watch_accessed_variables=False, persistent=kind == "multi") as tape:
        tape.watch(a)
        if linear:
            trunk, last, dense, _ = classifier  # type: ignore[misc]
            h = trunk([a, *rest]) if rest else trunk(a)
            with tape.stop_recording():  # its pull-back is the gather below
                scores = last(h)
        else:
            scores = head([a, *rest]) if rest else head(a)
        if not isinstance(scores, tf.Tensor):
            raise TypeError(
                f"the model must return one tensor of scores, got {type(scores).__name__}; "
                "wrap it in a model that returns the tensor to explain"
            )
        chosen = tf.zeros((0,), tf.int64)
        if callable(kind):
            y = kind(scores)
            if not isinstance(y, tf.Tensor) or not y.dtype.is_floating:
                return a, None, scores, chosen, y  # refused after the run, with the shared message
        elif scores.shape.rank != 2:
            return (a, None, scores, chosen, None)  # refused after the run by check_scores
        else:
            last = tf.cast(tf.shape(scores)[1] - 1, tf.int64)
            if kind == "argmax":
                chosen = tf.argmax(scores, axis=1)
            else:  # out-of-range indices are refused after the run, against the real C
                chosen = tf.clip_by_value(indices, 0, last)
            y = tf.gather(scores, chosen, batch_dims=1)  # (N,) or (N, T): y[n, t] = scores[n, c_nt]
    # The seeds wait for the scores: the pull-back of a head linear in A (pooling, dense) needs none
    # of the forward's values, and run first it would hold the gradients through the whole forward.
    with tf.control_dependencies([y]):
        if linear:  # W[:, c_nt] as (N, K_h), or (T, N, K_h) for (N, T) targets
            # a dense read of the kernel, then a gather: a gather *on the variable* (ResourceGather) would
            # switch it to copy-on-read, and every later read of it (the model's own forward) would copy W
            columns = tf.gather(tf.convert_to_tensor(dense.kernel), chosen, axis=1)  # (K_h, N) or (K_h, N, T)
            seeds = tf.cast(tf.transpose(columns, [1, 0] if kind != "multi" else [2, 1, 0]), h.dtype)
            out = h
        else:
            seeds = tf.ones_like(y) if kind != "multi" else tf.eye(tf.shape(y)[1], dtype=y.dtype)
            out = y
    if linear and pooled:  # (N, [T,] K) / Z, spread over the spatial axes
        if kind == "multi":
            seeds = tf.transpose(seeds, [1, 0, 2])  # (T, N, K) -> (N, T, K)
        spatial = tf.shape(a)[1:-1]
        mean = seeds / tf.cast(tf.reduce_prod(spatial), seeds.dtype)
        g = tf.broadcast_to(tf.reshape(mean, tf.concat([tf.shape(seeds), tf.ones_like(spatial)], 0)),
                            tf.concat([tf.shape(seeds), spatial], 0))
        return a, g, scores, chosen, y
    if kind == "multi":  # T pull-backs at once, vectorised over t (pfor)
        if linear:

            def pull_back(seed: tf.Tensor) -> tf.Tensor:
                return tape.gradient(out, a, output_gradients=seed)

        else:  # the seeds e_t of y (N, T)

            def pull_back(seed: tf.Tensor) -> tf.Tensor:
                return tape.gradient(out, a, output_gradients=tf.broadcast_to(seed, tf.shape(out)))

        g = tf.vectorized_map(pull_back, seeds)  # (T, N, *A); ops pfor cannot vectorise run as a loop
    else:
        g = tape.gradient(out, a, output_gradients=seeds)
    return a, g, scores, chosen, y


def channels_first(x: tf.Tensor, axis: int, lead: int, *, swap: bool = False) -> tf.Tensor:
    """Move the channel axis (last when ``axis == -1``) to position ``lead`` (after N, or N and T);
    with ``swap``, also the first two axes (``(T, N, ...)`` to ``(N, T, ...)``), in the same copy.

    A move that only shifts axes of size 1 is a reshape (no copy)."""
    rank = len(x.shape)
    perm = list(range(rank))
    if axis == -1 and rank > lead + 1:
        perm = list(range(lead)) + [rank - 1] + list(range(lead, rank - 1))
    if swap:
        perm[:2] = perm[1::-1]
    if perm == list(range(rank)):
        return x
    moved = [d for d in perm if x.shape[d] != 1]
    if x.shape.is_fully_defined() and moved == sorted(moved):
        return tf.reshape(x, [x.shape[d] for d in perm])
    return tf.transpose(x, perm)


def channels_last(x: tf.Tensor) -> tf.Tensor:
    """``(b, K, *spatial)`` -> ``(b, *spatial, K)``."""
    rank = len(x.shape)
    return x if rank <= 2 else tf.transpose(x, [0, *range(2, rank), 1])

