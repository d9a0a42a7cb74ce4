r"""The TensorFlow backend: Grad-CAM of Keras 3 models at a named layer, and of TF callables ``(features, head)``.

The design (the full account, with examples: docs/backends.md, "TensorFlow and Keras"): the
model is split at ``layer`` from its own graph (nothing of it changed; the last :data:`CACHED`
(model, layer) pairs kept); the part before the layer runs with no tape; ``tf.GradientTape``
watches A only and records the head; ``(N, T)`` targets are one vectorised pull-back, started at
the kernel's columns when the output is a linear ``Dense`` (:func:`_forward_backward`). Both run
as one ``tf.function`` (``compiled=True``), called through its concrete function
(:class:`_Dispatch`), with the core's Eq. 1-2 inside (:mod:`gradcam_ref._tf_array_api`). Keras
is channels-last: A comes back channels-first, ``(N, K, *spatial)`` (``channel_axis=-1``).

The model is called with ``training=False``; ``guided=True`` runs one more pass with guided ReLUs
(:mod:`~gradcam_ref.backends.tensorflow.guided`); :func:`perturb` re-scores perturbed copies
(Score-CAM: inputs through the model; Ablation-CAM: A through ``head``). Inputs are checked
against the model's input shape and for NaN/Inf; a softmax output warns
(:class:`ProbabilityScoresWarning`).
"""

from __future__ import annotations

import collections
import difflib
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
    probabilities_message,
    resolve_targets,
    same_parameters,
    shape_of,
    warn_zero_gradients,
)
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
    program, where = _program_for(model, layer)
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
        guided_backprop = _channels_first(gb, axis, 2 if len(gb.shape) == len(x.shape) + 1 else 1)
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


# --- the program: features without a tape, head under one ---------------------------------------


class _Program:
    """``features``/``head`` of one (model, layer) and the traced functions per target kind.

    ``classifier``: ``(trunk, last, dense, pooled)`` when ``head`` ends in a linear
    ``keras.layers.Dense`` ``dense`` (``head = last(trunk(parts))``, ``last`` that one layer's
    call; ``pooled``: ``trunk`` is A's channels-last global average), else None. The traced
    functions are kept per rank of the inputs: a relaxed signature (``reduce_retracing``) then
    never forgets the rank (a kernel traced for an unknown rank may abort the process).

    ``watched``: the Keras layers with an ``activation`` (those of the model, nested ones
    included): the traced functions, ``classifier`` and ``probabilities`` hold the activations
    they had, and :meth:`edited` tells when one was set anew (keras.io's ``layer.activation =
    None``), for :func:`_program_for` to build the program again.
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
                a = _channels_first(a, axis, 1)
            else:
                multi = len(g.shape) == len(a.shape) + 1  # g is (T, N, *A): one transpose to (N, T, K, *spatial)
                lead = 2 if multi else 1  # (N,) or (N, T) before A's axes
                a, g = _channels_first(a, axis, 1), _channels_first(g, axis, lead, swap=multi)
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


class _ShapeOnly:
    """Stands in for the scores where only their shape is read (the target parser's checks)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _host_proxy(y: Any) -> Any:
    """``y`` as NumPy, for the shared message of check_target_scores (array-api-compat has no TF)."""
    return y.numpy() if isinstance(y, tf.Tensor) else y


_PROGRAMS: collections.OrderedDict[tuple[Any, ...], tuple[Any, _Program]] = collections.OrderedDict()
"""The last :data:`CACHED` programs, by (id of the model or of features, layer name or id of head),
each with the object it was built for (held, so that its id cannot be reused while cached); one
whose layers' activations were set anew since (:meth:`_Program.edited`) is built again."""

CACHED = 8
"""How many (model, layer) programs stay traced; the oldest is dropped first."""


def _program_for(model: Any, layer: Any) -> tuple[_Program, str]:
    if isinstance(model, (tuple, list)):
        features, head = _split_form(model, layer)
        key: tuple[Any, ...] = ("split", id(features), id(head))
        owner: Any = (features, head)
    else:
        if isinstance(layer, str):  # the cached program of a name already resolved: no walk over the layers
            cached = _PROGRAMS.get(("layer", id(model), layer))
            if cached is not None and cached[0] is model and not cached[1].edited():
                _PROGRAMS.move_to_end(("layer", id(model), layer))
                return cached[1], cached[1].where
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model must be a keras.Model or a (features, head) pair of TF callables, "
                f"got {type(model).__name__}"
            )
        resolved = _resolve_layer(model, layer)
        key, owner = ("layer", id(model), resolved.name), model
    cached = _PROGRAMS.get(key)
    if cached is not None and not cached[1].edited():
        _PROGRAMS.move_to_end(key)
        return cached[1], cached[1].where
    if isinstance(model, (tuple, list)):

        def whole(v: Any, features: Callable = features, head: Callable = head) -> Any:
            return head(features(v))

        watched = _with_activation([layer for part in owner if isinstance(part, keras.Layer)
                                    for layer in (part, *(found for _, found in _all_layers(part)))])
        program = _Program(features, head, whole, "the output of features", watched=watched)
    else:
        program = _split_keras(model, resolved)
    _PROGRAMS[key] = (owner, program)
    while len(_PROGRAMS) > CACHED:
        _PROGRAMS.popitem(last=False)
    return program, program.where


def _split_keras(model: keras.Model, layer: keras.Layer) -> _Program:
    """``features`` up to ``layer`` (and the tensors that skip over it), ``head`` from there on."""
    graph = getattr(model, "_functional", None) or model  # a built Sequential keeps a Functional
    if not hasattr(graph, "_nodes_by_depth") or not getattr(model, "inputs", None):
        raise TypeError(
            f"model {model.name!r} ({type(model).__name__}) has no graph of layers to split at a layer "
            "name (a subclassed or unbuilt model): build it (call it once, or give it a keras.Input), "
            "or pass the split form model=(features, head)"
        )
    # A is the output of the layer's node in *this* graph: ``layer.output`` is its first node's in any
    # graph (a layer shared with another model), and a nested model's is its inner graph's tensor.
    calls = [node for nodes in graph._nodes_by_depth.values() for node in nodes if node.operation is layer]
    if len(calls) != 1:
        raise ValueError(
            f"layer {layer.name!r} is called {len(calls)} times in {model.name!r}; a layer called several "
            "times is ambiguous: pass the split form (features, head)"
        )
    a = calls[0].outputs[0] if len(calls[0].outputs) == 1 else list(calls[0].outputs)
    if isinstance(a, list):
        raise ValueError(f"layer {layer.name!r} returns {len(a)} tensors; Grad-CAM needs one (N, *spatial, K)")
    after: set[int] = {id(a)}
    frontier: list[Any] = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):  # from the inputs to the outputs
        for node in graph._nodes_by_depth[depth]:
            if node.is_input or not any(id(t) in after for t in node.input_tensors):
                continue
            frontier += [t for t in node.input_tensors if id(t) not in after and all(t is not f for f in frontier)]
            after.update(id(t) for t in node.outputs)
    outputs = list(model.outputs)
    if not all(id(t) in after for t in outputs):
        raise ValueError(f"the score does not depend on the output of layer {layer.name!r}: "
                         "no autograd path from it to the score")
    # the model's inputs are its own Input tensors: this Model adds no node to the layers
    features = keras.Model(model.inputs, [a, *frontier] if frontier else a, name=f"{model.name}_to_{layer.name}")
    producer = {id(t): n for nodes in graph._nodes_by_depth.values() for n in nodes for t in n.outputs}
    sources = [a, *frontier]
    head = _graph_part(graph, producer, sources, outputs)

    def run_features(x: Any) -> Any:
        return features(x, training=False)

    def whole(x: Any) -> Any:
        return model(x, training=False)

    classifier = None
    dense = _linear_classifier(producer, outputs, a, after)
    if dense is not None:
        h = dense.input_tensors[0]
        classifier = (_graph_part(graph, producer, sources, [h]), _graph_part(graph, producer, [h], outputs),
                      dense.operation, _pools_a(producer, h, a, frontier))
    expected = (model.name, tuple(model.inputs[0].shape)) if len(model.inputs) == 1 else None
    input_dtype = tf.as_dtype(model.inputs[0].dtype) if len(model.inputs) == 1 else None
    return _Program(run_features, head, whole, f"the output of layer {layer.name!r}", classifier,
                    expected=expected, input_dtype=input_dtype, probabilities=_probabilities(model, producer, outputs),
                    watched=_with_activation([found for _, found in _all_layers(model)]))


def _with_activation(layers: list[keras.Layer]) -> tuple[keras.Layer, ...]:
    """The layers (each once) whose ``call`` reads an ``activation`` attribute."""
    unique = {id(layer): layer for layer in layers if hasattr(layer, "activation")}
    return tuple(unique.values())


def _graph_part(graph: Any, producer: dict[int, Any], sources: list[Any], outputs: list[Any]) -> Callable:
    """``parts -> outputs``: the nodes of ``graph`` between the tensors ``sources`` and ``outputs``,
    run on ``parts`` (one tensor per source, or the one tensor) as Keras' Functional runs its
    graph (each node's call filled in with the values, ``training=False``), and no more.

    A ``keras.Model`` of these intermediate tensors would run the same, but Keras 3 clones their
    nodes onto the user's layers at each such build: the layers' ``_inbound_nodes`` would grow
    at every explain (``producer``: the node that outputs each tensor of the graph, by ``id``)."""
    stop, needed, pending = {id(t) for t in sources}, set(), list(outputs)
    while pending:  # back from the outputs to the sources
        tensor = pending.pop()
        node = None if id(tensor) in stop else producer.get(id(tensor))
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending += node.input_tensors
    nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
             for node in graph._nodes_by_depth[depth] if id(node) in needed]

    def run(parts: Any) -> Any:
        values = {id(t): v for t, v in zip(sources, parts if len(sources) > 1 else [parts], strict=True)}
        with tf.name_scope("gradcam_ref"):  # as a model's: a layer's name may not begin a root scope ('_avg_pool')
            for node in nodes:
                args, kwargs = node.arguments.fill_in(values)
                if "training" in getattr(node.operation, "_call_context_args", ()):
                    kwargs["training"] = False
                outputs_of_node = keras.tree.flatten(node.operation(*args, **kwargs))
                values.update(zip(map(id, node.outputs), outputs_of_node, strict=False))  # as Keras pairs them
        return values[id(outputs[0])] if len(outputs) == 1 else [values[id(t)] for t in outputs]

    return run


def _probabilities(model: keras.Model, producer: dict[int, Any], outputs: list[Any]) -> str | None:
    """The warning for a model whose one output is a softmax (or log-softmax): the activation of
    its last layer (a ``Dense``, an ``Activation``, a ``Softmax``), also inside nested models."""
    if len(outputs) != 1:
        return None
    node, path = producer.get(id(outputs[0])), []
    while node is not None and isinstance(node.operation, keras.Model):  # the nested model's own last layer
        inner = getattr(node.operation, "_functional", None) or node.operation
        if not hasattr(inner, "_nodes_by_depth") or len(node.operation.outputs) != 1:
            return None
        path.append(node.operation.name)
        node = next((n for nodes in inner._nodes_by_depth.values() for n in nodes
                     if any(t is node.operation.outputs[0] for t in n.outputs)), None)
    if node is None:
        return None
    op = node.operation
    softmaxes = {keras.activations.softmax: "softmax", keras.activations.log_softmax: "log_softmax",
                 tf.nn.softmax: "softmax", tf.nn.log_softmax: "log_softmax"}
    name = "softmax" if isinstance(op, keras.layers.Softmax) else softmaxes.get(getattr(op, "activation", None))
    rank = len(outputs[0].shape)
    axes = getattr(op, "axis", -1) if isinstance(op, keras.layers.Softmax) else -1  # activations: the last
    if name is None or rank < 2 or [a % rank for a in np.atleast_1d(axes)] != [rank - 1]:  # not over the classes
        return None
    where = "/".join([*path, op.name])
    return probabilities_message(f"model {model.name!r}", name, f" {where!r} ({type(op).__name__})",
                                 f"a model without the final {name} (keras.applications: "
                                 "classifier_activation=None; the same weights load)")


def _pools_a(producer: dict[int, Any], h: Any, a: Any, frontier: list[Any]) -> bool:
    """Whether ``h`` is A's channels-last global average: ``keras.layers.GlobalAveragePooling{1,2,3}D``
    on A itself, then nothing but ``Dropout`` layers (the identity at inference), nothing else
    after the layer. ``producer``: the node that outputs each tensor of the graph, by ``id``."""
    pools = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
             keras.layers.GlobalAveragePooling3D)
    node = producer.get(id(h))
    while node is not None and type(node.operation) is keras.layers.Dropout and len(node.input_tensors) == 1:
        node = producer.get(id(node.input_tensors[0]))
    return (node is not None and not frontier and type(node.operation) in pools
            and node.operation.data_format == "channels_last" and not node.operation.keepdims
            and len(node.input_tensors) == 1 and node.input_tensors[0] is a)


def _linear_classifier(producer: dict[int, Any], outputs: list[Any], a: Any, after: set[int]) -> Any:
    """The node of the model's one output when it is a linear ``keras.layers.Dense`` on a tensor
    computed from A (``a``; ``after``: the ids of the tensors that depend on it; ``producer``: each
    tensor's node, by ``id``), else None.

    Only the plain layer: no subclass (its ``call`` may differ), no quantized kernel, no
    activation; its ``kernel`` (with LoRA, the sum it multiplies by) is read at each call.
    """
    if len(outputs) != 1 or outputs[0] is a:
        return None
    node = producer.get(id(outputs[0]))
    if node is None or type(node.operation) is not keras.layers.Dense or len(node.input_tensors) != 1:
        return None
    dense = node.operation
    if (getattr(dense, "quantization_mode", None) is not None
            or dense.activation not in (None, keras.activations.linear)
            or id(node.input_tensors[0]) not in after or len(node.input_tensors[0].shape) != 2):
        return None
    return node


def _resolve_layer(model: keras.Model, layer: Any) -> keras.Layer:
    """The layer that ``layer`` names (or is) in ``model``."""
    if isinstance(layer, keras.Layer):
        if any(candidate is layer for candidate in model.layers):
            return layer
        nested = [path for path, candidate in _all_layers(model) if candidate is layer]
        if nested:
            raise ValueError(_nested_message(f"{layer.name!r} (a {type(layer).__name__})", nested[0], model))
        raise ValueError(f"layer is a {type(layer).__name__} ({layer.name!r}) that is not a layer of {model.name!r}")
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or a keras.Layer, got {type(layer).__name__}")
    names = [candidate.name for candidate in model.layers]
    if layer is None:
        raise ValueError(f"layer is required: a layer name of {model.name!r} (e.g. {names[-3:]}) or the layer itself")
    if layer in names:
        return model.get_layer(layer)
    nested = [path for path, _ in _all_layers(model) if path.split("/")[-1] == layer]
    if nested:
        raise ValueError(_nested_message(repr(layer), nested[0], model))
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.6)
    hint = f"did you mean {close}?" if close else f"its layers include {names[:5]} ... {names[-3:]}"
    raise ValueError(f"layer {layer!r} is not a layer of {model.name!r}; {hint}")


def _nested_message(what: str, path: str, model: keras.Model) -> str:
    return (f"layer {what} is inside a nested model ({path}), not a layer of {model.name!r}: pass that "
            f"nested model itself (layer={path.split('/')[0]!r}) or the split form (features, head)")


def _all_layers(model: keras.Layer, prefix: str = "") -> list[tuple[str, keras.Layer]]:
    found = []
    for layer in getattr(model, "layers", ()):
        path = f"{prefix}{layer.name}"
        found.append((path, layer))
        if isinstance(layer, keras.Model):
            found += _all_layers(layer, path + "/")
    return found


def _split_form(model: tuple[Any, ...] | list[Any], layer: Any) -> tuple[Callable, Callable]:
    if len(model) != 2 or not all(callable(m) for m in model):
        raise TypeError(
            f"the split form of model is a pair (features, head) of callables, "
            f"got {[type(m).__name__ for m in model]}"
        )
    if layer is not None:
        raise ValueError(
            "in the split form (features, head) the layer is the output of features: "
            f"leave layer unset (got layer={layer!r})"
        )
    return model[0], model[1]


# --- arguments and checks ----------------------------------------------------------------------


def score(model: Any, inputs: Any) -> tf.Tensor:
    """The scores ``(N, classes)`` of a Keras model (``training=False``) or of ``head(features(x))``."""
    x = _as_inputs(inputs)
    if isinstance(model, (tuple, list)):
        features, head = _split_form(model, None)
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
    program, where_name = _program_for(model, layer)
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
    activations = _channels_first(a, axis, 1)
    check_feature_maps("activations", activations)
    if where == "inputs" and axis == -1 and len(x.shape) != len(a.shape):
        raise ValueError(
            f"where='inputs' with channel_axis={channel_axis}: the inputs are taken to have their channels "
            f"on that axis too, so they must have the rank of the activations; got inputs {shape_of(x)}"
        )
    x_first, masked = x, activations
    if where == "inputs":  # the core multiplies them: one dtype, the inputs' as the model takes them
        dtype = _model_input_dtype(x, a, program)
        x_first, masked = tf.cast(_channels_first(x, axis, 1), dtype), tf.cast(activations, dtype)
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
                batch = _channels_last(batch)
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


def _model_input_dtype(x: tf.Tensor, a: tf.Tensor, program: _Program) -> tf.DType:
    """The floating dtype the model takes ``x`` in: its Keras Input's (to which Keras casts), else
    that of ``x``, else (integer inputs to a split form) that of A."""
    for dtype in (program.input_dtype, x.dtype):
        if dtype is not None and dtype.is_floating:
            return dtype
    return a.dtype


def _check_input_shape(x: tf.Tensor, program: _Program) -> None:
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


def _channels_first(x: tf.Tensor, axis: int, lead: int, *, swap: bool = False) -> tf.Tensor:
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


def _channels_last(x: tf.Tensor) -> tf.Tensor:
    """``(b, K, *spatial)`` -> ``(b, *spatial, K)``."""
    rank = len(x.shape)
    return x if rank <= 2 else tf.transpose(x, [0, *range(2, rank), 1])
