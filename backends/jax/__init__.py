r"""The JAX backend: Grad-CAM of a Flax, Equinox or split ``(features, head)`` model, as one compiled program.

For inputs ``x`` ``(N, ...)`` one ``jax.jit`` program runs::

    A, scores, vjp = seam.linearize(x)    A (N, K, *spatial), channels on ``channel_axis``; vjp of
                                          the part after A only (:mod:`.models`)
    dy^c/dA = vjp(one_hot(c))             one pull-back for N targets; jax.vmap over T targets
    the core's grad_cam_fields            Eq. 1, Eq. 2, Guided Grad-CAM, inside the program

compiled once per ``(seam, target callable, channel_axis, guided)`` and input shape; a model's
parameters are an argument of the program. :func:`capture` and :func:`explain` both run that
program (``_program``). The maps are differentiable (``jax.grad`` through the backward pass).
Guided backpropagation re-interprets the jaxpr of the whole model
(:mod:`gradcam_ref.backends.jax.guided`). The models and the rest of the story: docs/backends.md.
``differentiable="stop"`` puts ``lax.stop_gradient`` on dy/dA (alpha held constant, GAIN);
``"full"`` is what the program always is. A Flax or Equinox model carries its parameters (they
are the program's argument): ``jax.grad`` over linen ``variables``, ``nnx.grad``,
``eqx.filter_grad`` differentiate them; ``params`` (split form only) calls the model as
``features(params, x)``, ``head(params, A)``, for ``jax.grad`` w.r.t. the weights.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import warnings
import weakref
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
    arguments_of,
    check_feature_maps,
    check_finite,
    check_scores,
    check_target_scores,
    check_where,
    class_indices,
    differentiable_mode,
    grad_cam_fields,
    perturb_chunks,
    same_parameters,
    shape_of,
    warn_zero_gradients,
)
from gradcam_ref.backends.jax import guided as jax_guided
from gradcam_ref.backends.jax import models as jax_models

NAME = "jax"
GUIDED = True
DIFFERENTIABLE = True

__all__ = ["DIFFERENTIABLE", "GUIDED", "NAME", "capture", "explain", "perturb", "score"]


def capture(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    layer: Any = None,
    guided: bool = False,
    channel_axis: int | None = None,
    call: int | None = None,
    variables: Any = None,
    differentiable: bool | str = False,
    params: Any = None,
) -> Capture:
    r"""A, dy/dA and the scores of ``model`` at ``layer`` on ``inputs``, by one jitted program.

    Args:
      model: a bound ``flax.linen`` module (or an unbound one with ``variables=``), an
        ``nnx.Module``, an ``eqx.Module`` (called on one example: it is ``jax.vmap``-ed over the
        batch), or ``(features, head)``, two hashable JAX-traceable callables
        ``features(inputs) -> A`` and ``head(A) -> scores``.
      inputs: the batch ``(N, ...)``, a ``jax.Array`` (NumPy arrays are converted).
      target: ``None`` (each example's predicted class), an int, N ints, an int array ``(N, T)``
        (T maps per example) or a callable ``scores -> (N,)``. A traced int array (inside an
        outer ``jax.jit``) is accepted; its range cannot be checked before it runs, so the maps,
        weights and gradients of an index outside ``[0, C)`` come out as NaN (NaN-poisoning: no
        host sync, works under ``jit``, ``vmap`` and ``grad``; concrete targets are checked
        and refused before anything runs).
      layer: the submodule whose output is A: its dotted path (linen: ``module.path`` joined by
        dots, ``"backbone.block3.conv"``; NNX and Equinox: attribute names and sequence indices,
        ``"features.3"``), a bound linen submodule, or (Equinox) a ``where`` function as
        ``eqx.tree_at`` takes. None in the split form, whose seam is the layer.
      guided: also compute ``guided_backprop``, the input gradient through guided ReLUs.
      channel_axis: the axis of ``A`` holding its K channels. None: the layout of the library's
        convolutions: -1 for Flax (linen, NNX: NHWC), 1 for Equinox (channels-first per example)
        and for the split form.
      call: which call of ``layer``, when it runs more than once per forward pass (0, 1, ...,
        -1 for the last).
      variables: the variables of an unbound linen ``model``.
      differentiable: False or ``"full"`` (the program is differentiable end to end, second
        order through alpha), or ``"stop"`` (``lax.stop_gradient`` on dy/dA: alpha constant).
        W.r.t. the parameters of a model at a named layer, differentiate the model with its
        library's transform: ``jax.grad`` over the ``variables`` of ``module.bind(variables)``
        (or of ``variables=``), ``nnx.grad`` over an NNX model, ``eqx.filter_grad`` over an
        Equinox model; the input's gradient comes the same way (``jax.grad`` w.r.t. ``inputs``).
      params: split form only: None, or a pytree of parameters; then ``features(params, x)`` and
        ``head(params, A)``, and ``jax.grad`` w.r.t. ``params`` flows through the program. A
        Flax or Equinox model carries its own (``params=`` with one is refused, by name).

    Returns:
      JAX arrays on the default device, ``activations`` and ``gradients`` moved to channels-first
      ``(N, K, *spatial)`` (``(N, T, K, *spatial)`` for ``(N, T)`` targets). ``targets`` is an
      int64 NumPy array (None for a callable target), except when the call itself is traced (an
      outer ``jax.jit``, ``jax.grad``, ...) and the targets are the traced argmax or a traced
      argument: then it is that JAX int array. ``guided_backprop`` is ``(N, C, *spatial)``
      (``(N, T, C, *spatial)``), channels-first like the activations, or None.
    """
    return _run(model, inputs, target, layer, guided, channel_axis, call, variables, differentiable, params)[0]


@same_parameters(capture)
def explain(*args: Any, **kwargs: Any) -> Explanation:
    """The :class:`~gradcam_ref.Explanation` of :func:`capture`, its core math run inside the same program."""
    return Explanation.from_capture(*_run(**arguments_of(explain, args, kwargs)))


def score(model: Any, inputs: Any, *, params: Any = None) -> jax.Array:
    """The scores ``(N, classes)`` of ``model = (features, head)`` on ``inputs``, jitted (for re-scoring)."""
    seam, params, _ = jax_models.seam(model, None, params=params)
    x = _as_inputs(inputs)
    out = _scores(x, params, seam=seam)
    check_scores(out)
    _check_same_batch("the model's output", out, x)
    return out


def _scores_impl(x: jax.Array, params: Any, *, seam: Any) -> Any:
    return seam.forward(params, x)


_scores = jax.jit(_scores_impl, static_argnames=("seam",))


def _run(
    model: Any, inputs: Any, target: Any, layer: Any, guided: bool, channel_axis: int | None,
    call: int | None, variables: Any, differentiable: bool | str = False, params: Any = None,
) -> tuple[Capture, GradCamFields]:
    """Check the arguments (by name, before any trace), run the program, check its result."""
    stop = differentiable_mode(differentiable, guided) == "stop"
    seam, params, default_axis = jax_models.seam(model, layer, variables=variables, call=call, params=params)
    channel_axis = default_axis if channel_axis is None else channel_axis
    x = _as_inputs(inputs)
    guided = bool(guided)
    if guided and not jnp.issubdtype(x.dtype, jnp.floating):  # JAX would pull back a float0 cotangent
        raise TypeError(f"guided=True differentiates w.r.t. the inputs, which must be floating, got {x.dtype}")
    static = {"seam": seam, "channel_axis": channel_axis}
    # The forward pass's shapes, from an abstract trace (cached by jax.jit): A is checked inside it.
    a_struct, scores = _forward.eval_shape(x, params, **static)
    if not isinstance(scores, jax.ShapeDtypeStruct):
        raise TypeError(
            f"head(A) must return one array of scores, got a {type(scores).__name__}; pass a head "
            "that returns the array to explain, e.g. lambda a: head(a)[0] or lambda a: head(a)['logits']"
        )
    if callable(target):
        _check_hashable("target", target)
        indices, targets_out = None, None
    else:
        check_scores(scores)
        _check_same_batch("the model's scores", scores, x)
        indices, targets_out = _class_indices(target, scores)
    if guided and channel_axis != 1 and x.ndim != a_struct.ndim:
        raise ValueError(
            f"guided=True with channel_axis={channel_axis}: the inputs are taken to have their channels "
            f"on that axis too, so they must have the rank of the activations; got inputs {shape_of(x)}"
        )
    captured, fields, traced_targets, flags = _program(
        x, params, indices, target_fn=target if callable(target) else None, guided=guided, stop=stop, **static)
    if guided:
        _warn_unguided(_GUIDED_RECORDS.get((seam, shape_of(x), jnp.dtype(x.dtype))))
    # Inside the program the core's finite checks see tracers and are skipped; the program
    # computes two flags instead, read in one transfer (the only host sync of a call): all
    # finite (of the signed map: the ReLU turns NaN into 0), some gradient exactly zero. Only
    # then do the checks run, for their messages naming the culprit.
    if not isinstance(flags, jax.core.Tracer):
        finite, zero = (bool(f) for f in np.asarray(flags))
        if not finite:
            check_finite(fields.weights, "grad_cam", gradients=captured.gradients)
            check_finite(fields.signed, "grad_cam", activations=captured.activations, gradients=captured.gradients)
        if zero:
            _warn_zero_gradients(captured.gradients, captured.activations.ndim, seam.what)
    if targets_out is None and traced_targets is not None:
        targets_out = _host_ints(traced_targets)
    return captured._replace(targets=targets_out), fields


# --- The compiled program --------------------------------------------------------------------


def _checked(x: jax.Array, what: str, channel_axis: int) -> Callable[[Any], Any]:
    """The check of A (``what``'s output), at trace time before anything consumes it."""

    def check(a: Any) -> Any:
        if not isinstance(a, (jax.Array, jax.ShapeDtypeStruct)):
            raise TypeError(f"{what} must return one array (the activations A), got {type(a).__name__}")
        rank = a.ndim
        if rank < 3:
            raise ValueError(
                f"{what} must return activations of shape (N, K, *spatial) (channels on "
                f"channel_axis={channel_axis}) with at least one spatial axis, "
                f"got shape {shape_of(a)} (rank {rank})"
            )
        axis = _channel_axis(channel_axis, rank)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{what} must return floating activations, got dtype {a.dtype}")
        _check_same_batch(what, a, x)
        check_feature_maps(f"{what}, channels first,", _moved_shape(a, axis))  # no empty axis
        return a

    return check


def _forward_impl(x: jax.Array, params: Any, *, seam: Any, channel_axis: int) -> Any:
    return seam.activations_and_scores(params, x, _checked(x, seam.what, channel_axis))


def _program_impl(
    x: jax.Array,
    params: Any,
    indices: jax.Array | None,
    *,
    seam: Any,
    target_fn: Callable | None,
    channel_axis: int,
    guided: bool = False,
    stop: bool = False,
) -> tuple[Any, ...]:
    r"""Everything, traced once: forward, one backward per target, Eq. 1 and Eq. 2 (the core's).

    ``seam.linearize`` gives A, the scores and the VJP of the part of the model after A only
    (:mod:`gradcam_ref.backends.jax.models`). ``indices`` is None (use ``argmax(scores, 1)``),
    ``(N,)`` or ``(N, T)`` class indices; or ``target_fn`` maps scores to ``(N,)`` and the
    gradient is that of :math:`\sum_n` ``target_fn(scores)[n]``. ``stop``: dy/dA is a constant for
    differentiation (GAIN's mode).
    """
    a, scores, head_vjp = seam.linearize(params, x, _checked(x, seam.what, channel_axis))
    multi = False
    given = indices is not None
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
    if stop:
        gradients = jax.lax.stop_gradient(gradients)
    axis = _channel_axis(channel_axis, a.ndim)
    a_first = jnp.moveaxis(a, axis, 1)
    g_first = jnp.moveaxis(gradients, axis + 1, 2) if multi else jnp.moveaxis(gradients, axis, 1)
    guided_backprop = None
    if guided:  # the same seeds, pulled back to x through the whole model with guided ReLUs
        record = _GUIDED_RECORDS[(seam, shape_of(x), jnp.dtype(x.dtype))] = jax_guided.Record()
        whole = jax_guided.guided(lambda v, p: seam.forward(p, v), record)
        _, guided_vjp = jax.vjp(lambda v: whole(v, params), x)
        guided_backprop = _pull_back(guided_vjp, seeds, multi)
        if axis != 1:  # the inputs' channels on the activations' axis: channels-first, like A
            guided_backprop = jnp.moveaxis(guided_backprop, axis + multi, 1 + multi)
    captured = Capture(a_first, g_first, scores, None, guided_backprop)
    fields = grad_cam_fields(captured)
    if given and indices is not None:  # traced targets outside [0, C): NaN, not a silent zero map
        valid = (indices >= 0) & (indices < scores.shape[1])
        captured, fields = _poison(captured, fields, valid)
    finite = jnp.all(jnp.isfinite(fields.weights)) & jnp.all(jnp.isfinite(fields.signed))
    lead = g_first.ndim - a_first.ndim + 1
    zero = jnp.any(jnp.max(jnp.abs(g_first), axis=tuple(range(lead, g_first.ndim))) == 0)
    return captured, fields, indices, jnp.stack([finite, zero])


def _poison(captured: Capture, fields: GradCamFields, valid: jax.Array) -> tuple[Capture, GradCamFields]:
    """Every array of the examples (and targets) whose ``valid`` is False set to NaN."""

    def nan_where_invalid(x: jax.Array | None) -> jax.Array | None:
        if x is None:
            return None
        mask = jnp.reshape(valid, valid.shape + (1,) * (x.ndim - valid.ndim))
        return jnp.where(mask, x, jnp.nan)

    captured = captured._replace(
        gradients=nan_where_invalid(captured.gradients),
        guided_backprop=nan_where_invalid(captured.guided_backprop),
    )
    return captured, GradCamFields(*(nan_where_invalid(f) for f in fields))


def _pull_back(vjp: Callable, seeds: jax.Array, multi: bool) -> jax.Array:
    """``vjp(seeds)``; for ``(N, T, C)`` seeds, T pull-backs in one (``vmap`` over the target axis)."""
    if multi:
        per_target = jax.vmap(lambda seed: vjp(seed)[0])(jnp.moveaxis(seeds, 1, 0))
        return jnp.moveaxis(per_target, 0, 1)  # (T, N, ...) -> (N, T, ...)
    (out,) = vjp(seeds)
    return out


class _WeakRecords:
    """What the last trace of a guided program found, per (seam, input shape, dtype).

    The seam's functions and modules are held weakly (``weakref.ref``; ``WeakMethod`` for bound methods, which are
    made anew at each attribute access but compare equal): an entry neither keeps a model's
    closures (and the arrays they hold) alive nor outlives them. Functions that cannot be
    weakly referenced go to a small LRU table of ``STRONG_LIMIT`` entries. (``jax.jit``'s own
    cache holds static arguments until ``jax.clear_caches()``.)
    """

    STRONG_LIMIT = 16

    def __init__(self) -> None:
        self._weak: dict[tuple[Any, ...], jax_guided.Record] = {}
        self._strong: collections.OrderedDict[tuple[Any, ...], jax_guided.Record] = collections.OrderedDict()

    @staticmethod
    def _ref(fn: Callable) -> Any:
        if inspect.ismethod(fn):
            return weakref.WeakMethod(fn)
        return weakref.ref(fn)

    def _key(self, key: tuple[Any, ...]) -> tuple[Any, ...] | None:
        seam, *rest = key
        try:  # the seam's callables (functions, modules) weakly, its plain settings as they are
            parts = tuple(self._ref(v) if callable(v) else v
                          for v in (getattr(seam, f.name) for f in dataclasses.fields(seam)))
            hash(parts)
        except TypeError:  # not weakly referenceable, or not hashable
            return None
        return (type(seam), parts, *rest)

    @staticmethod
    def _alive(key: tuple[Any, ...]) -> bool:
        return all(r() is not None for r in key[1] if isinstance(r, weakref.ref))

    def __setitem__(self, key: tuple[Any, ...], record: jax_guided.Record) -> None:
        weak = self._key(key)
        if weak is None:
            self._strong[key] = record
            self._strong.move_to_end(key)
            while len(self._strong) > self.STRONG_LIMIT:
                self._strong.popitem(last=False)
            return
        self._weak = {k: v for k, v in self._weak.items() if self._alive(k)}
        self._weak[weak] = record

    def get(self, key: tuple[Any, ...]) -> jax_guided.Record | None:
        weak = self._key(key)
        return self._strong.get(key) if weak is None else self._weak.get(weak)

    def __len__(self) -> int:
        return sum(1 for k in self._weak if self._alive(k)) + len(self._strong)


_GUIDED_RECORDS = _WeakRecords()
"""What the last trace of a guided program found (see :class:`_WeakRecords`)."""


def _warn_zero_gradients(gradients: jax.Array, rank: int, what: str) -> None:
    """Warn about examples (and targets) whose gradients are zero everywhere (after the flag said so)."""
    g = np.asarray(gradients)
    lead = g.ndim - rank + 1  # 1 (N,) or 2 (N, T)
    zero = np.max(np.abs(g), axis=tuple(range(lead, g.ndim))) == 0
    warn_zero_gradients(zero, what, stacklevel=4)


def _warn_unguided(record: jax_guided.Record | None) -> None:
    if record is None:
        return
    if not record.counts:
        warnings.warn(
            "guided=True but the model has no ReLU that the guided pass recognises (see "
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


_forward = jax.jit(_forward_impl, static_argnames=("seam", "channel_axis"))
_program = jax.jit(_program_impl, static_argnames=("seam", "target_fn", "channel_axis", "guided", "stop"))


# --- Re-scoring perturbed copies (Score-CAM, Ablation-CAM) ---------------------------------


def perturb(
    model: Any,
    inputs: Any,
    make: Callable[..., Any],
    *,
    layer: Any = None,
    where: str = "activations",
    batch_size: int = 32,
    count: Callable[[Any, int], int] | None = None,
    channel_axis: int | None = None,
    call: int | None = None,
    variables: Any = None,
    params: Any = None,
    scored: Callable[[Any], Any] | None = None,
    input_channel_axis: int | None = None,
) -> Perturbed:
    """Score perturbed copies of each example (the Protocol's ``perturb``), jitted per batch shape.

    ``model``, ``layer``, ``channel_axis``, ``call``, ``variables`` and ``params`` as in
    :func:`capture`. ``where="activations"``: the layer's output is replaced by each perturbed copy
    (moved back to ``channel_axis``) and only the part after it runs (the split form's ``head``; a
    named layer's model under ``jax.vmap`` over the copies, which leaves the part before the layer
    unbatched: it runs once). ``where="inputs"``: the whole model on masked inputs, given to
    ``make`` channels-first: their channels are on ``input_channel_axis``, by default where the
    model's own layout puts A's (a Flax ``Conv``: last) or ``channel_axis``. A ``channel_axis``
    given for A may not hold for the inputs (a split form may move A's channels alone): where
    the inputs' spatial axes would then be smaller than A's, ``input_channel_axis`` is required
    (else the wrong axes would be masked without an error). Every batch is padded to
    ``batch_size`` rows, so
    one compiled program scores them all. ``count`` as in the Protocol (NaN rows after
    ``count(A, n)`` copies).
    """
    check_where(where)
    seam, params, default_axis = jax_models.seam(model, layer, variables=variables, call=call, params=params)
    given_axis, channel_axis = channel_axis, default_axis if channel_axis is None else channel_axis
    x = _as_inputs(inputs)
    a_raw, scores = _forward(x, params, seam=seam, channel_axis=channel_axis)
    axis = _channel_axis(channel_axis, a_raw.ndim)
    a = jnp.moveaxis(a_raw, axis, 1)
    in_axis = axis
    if where == "inputs" and input_channel_axis is not None:
        in_axis = _channel_axis(input_channel_axis, x.ndim, "input_channel_axis", "the inputs")
    elif where == "inputs" and given_axis is not None and axis != _channel_axis(default_axis, a_raw.ndim):
        # A's channel_axis taken for the inputs too: refused where their spatial axes would then be
        # smaller than A's (channels-first inputs of a split form that moves A's channels alone).
        spatial = tuple(int(d) for j, d in enumerate(x.shape) if j not in (0, axis % max(x.ndim, 1)))
        if len(spatial) != a.ndim - 2 or any(d < s for d, s in zip(spatial, a.shape[2:], strict=False)):
            raise ValueError(
                f"score-cam masks the inputs: with channel_axis={given_axis} their spatial axes would be "
                f"{spatial}, smaller than A's {tuple(a.shape[2:])}; pass input_channel_axis, where the "
                "inputs' channels are (1 for (N, C, H, W) inputs, -1 for (N, H, W, C))"
            )
    if where == "inputs" and in_axis != 1 and x.ndim != a_raw.ndim:
        raise ValueError(
            f"where='inputs' with channel_axis={channel_axis}: the inputs are taken to have their channels "
            f"on that axis too, so they must have the rank of the activations; got inputs {shape_of(x)}"
        )
    x_first = jnp.moveaxis(x, in_axis, 1) if where == "inputs" else x
    index = seam.index(params, x[:1])
    n, k = int(a.shape[0]), int(a.shape[1])
    if scored is not None:
        scored(scores)
    rows = []
    for i, copies, spans in perturb_chunks(a, batch_size, count):
        for start, stop in spans:
            batch = jnp.moveaxis(make(x_first, a, i, start, stop), 1, in_axis if where == "inputs" else axis)
            padded = jnp.concatenate([batch, jnp.zeros((batch_size - (stop - start), *batch.shape[1:]), batch.dtype)])
            if where == "activations":
                out = _score_replaced(params, x[i:i + 1], padded, seam=seam, index=index)
            else:
                out = _score_inputs(params, padded, seam=seam)
            rows.append(out[: stop - start])
        if copies < k:  # the rows no copy was asked for
            rows.append(jnp.full((k - copies, *scores.shape[1:]), jnp.nan, scores.dtype))
    perturbed = jnp.concatenate(rows).reshape(n, k, *scores.shape[1:])
    return Perturbed(a, scores, perturbed)


_score_replaced = jax.jit(lambda params, x, a, *, seam, index: seam.replaced(params, x, a, index),
                          static_argnames=("seam", "index"))
_score_inputs = jax.jit(lambda params, batch, *, seam: seam.forward(params, batch), static_argnames=("seam",))


# --- Checks -----------------------------------------------------------------------------------


_check_hashable = jax_models.check_hashable


def _as_inputs(inputs: Any) -> jax.Array:
    """``inputs`` as a JAX array (NumPy arrays converted), refused before any trace if not a non-empty batch.

    An empty batch would reach the model, where a flatten head divides by N = 0 (an integer modulo
    by zero inside the trace), as in torch and TensorFlow it is refused by name.
    """
    x = inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {shape_of(x)}")
    return x


def _channel_axis(channel_axis: int, rank: int, name: str = "channel_axis", of: str = "the activations") -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {channel_axis!r}")
    axis = int(channel_axis) + rank if channel_axis < 0 else int(channel_axis)
    if not 1 <= axis < rank:
        raise ValueError(
            f"{name} must name a non-batch axis of {of} (rank {rank}): "
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

