"""``explain``: a backend captures A, dy/dA and y at a layer; the core turns them into maps.

The contract between the two is ``gradcam_ref.backends._contract.Backend``; an
:class:`Explanation` is built in one place, :meth:`Explanation.from_capture`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import numpy as np

from gradcam_ref._arrays import (
    Array,
    as_float_arrays,
    check_choice,
    check_flag,
    check_int,
    check_nonnegative,
    device_of,
    is_array,
    namespace,
    same_library,
    shape_of,
    shown,
    to_numpy,
)
from gradcam_ref._gradcam import cam, grad_cam_parts, relu_map
from gradcam_ref._guided import guided_grad_cam
from gradcam_ref._methods import (
    ABLATION_DENOMINATORS,
    ABLATION_VALUES,
    SCORE_CAM_VARIANTS,
    _smooth_weights,
    ablated_activations,
    ablation_cam_weights,
    check_method,
    given_weights_fields,
    method_fields,
    score_cam_masks,
    score_cam_weights,
    torchcam_smooth_weights,
)
from gradcam_ref._targets import Target, resolve_targets
from gradcam_ref._warnings import NonPositiveScoreWarning
from gradcam_ref.conventions import method_signed_map, postprocess

DIFFERENTIABLE_MODES = (False, "stop", "full")
"""``explain(differentiable=...)``: inference; alpha held constant (GAIN's choice); second order."""


def differentiable_mode(differentiable: Any, guided: bool = False) -> str | None:
    """``differentiable`` checked: None for False, else ``"stop"`` or ``"full"``."""
    if differentiable is False:
        return None
    if not isinstance(differentiable, str) or differentiable not in ("stop", "full"):
        raise ValueError(
            f"differentiable must be one of {DIFFERENTIABLE_MODES} (True is ambiguous: say which "
            f"gradient mode), got {shown(differentiable)}"
        )
    if guided:
        raise ValueError(f"guided=True cannot be combined with differentiable={differentiable!r}")
    return str(differentiable)


class Capture(NamedTuple):
    """What a backend returns: everything Grad-CAM needs from a model, and nothing computed.

    Attributes:
      activations: :math:`A`, the layer's output (or input), ``(N, K, *spatial)``.
      gradients: :math:`\\partial y^c / \\partial A`, ``(N, K, *spatial)``, or
        ``(N, T, K, *spatial)`` for ``(N, T)`` targets.
      scores: the model's output, usually ``(N, C)`` pre-softmax scores.
      targets: the class indices explained, int ``(N,)`` or ``(N, T)``; None for a callable target.
      guided_backprop: guided backpropagation to the input, ``(N, C, *S)`` or ``(N, T, C, *S)``
        (see :mod:`gradcam_ref._guided`); None unless asked for (``guided=True``).
    """

    activations: Array
    gradients: Array  # None for the perturbation methods, which need none
    scores: Array
    targets: Any
    guided_backprop: Array | None = None


class Perturbed(NamedTuple):
    """What a backend's ``perturb`` returns: the layer's A, the scores, and the perturbed scores.

    Attributes:
      activations: :math:`A` of ``inputs``, ``(N, K, *spatial)``, channels first.
      scores: the model's output for ``inputs``, ``(N, C)``.
      perturbed_scores: the model's output for each of the perturbed versions of each example,
        ``(N, K, C)``; with ``perturb(count=...)``, rows ``count(A, n):`` of example n are NaN.
    """

    activations: Array
    scores: Array
    perturbed_scores: Array


class GradCamFields(NamedTuple):
    """What the core computes from a :class:`Capture` (see :func:`grad_cam_fields`)."""

    weights: Array
    signed: Array
    maps: Array
    guided_grad_cam: Array | None


def grad_cam_fields(capture: Capture) -> GradCamFields:
    """Eq. 1 (``weights``), Eq. 2 before and after its ReLU (``signed``, ``maps``) and Guided Grad-CAM.

    Array code only, so a backend may run it inside a compiled program (``jax.jit``); the
    finiteness checks of :func:`gradcam_ref.grad_cam` run when the values can be read.
    """
    weights, signed = grad_cam_parts(capture.activations, capture.gradients)
    maps = relu_map(signed)
    guided = capture.guided_backprop
    ggc = None if guided is None else guided_grad_cam(
        guided, maps, spatial_rank=len(capture.activations.shape) - 2)
    return GradCamFields(weights, signed, maps, ggc)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """A Grad-CAM explanation and every intermediate, as arrays of the model's library.

    Attributes:
      maps: :math:`L^c = \\mathrm{ReLU}(\\sum_k \\alpha_k^c A^k)` at the layer's resolution,
        ``(N, *spatial)``, or ``(N, T, *spatial)`` for ``(N, T)`` targets; in the activations' dtype for
        every method (a float16 layer under a float32 head gives float16 maps: half precision is computed
        in float32 and cast back, :func:`gradcam_ref._arrays.widen_half`).
      activations: :math:`A`, ``(N, K, *spatial)``.
      gradients: :math:`\\partial y^c / \\partial A`, the shape of ``activations`` or
        ``(N, T, K, *spatial)``.
      weights: :math:`\\alpha^c` (Eq. 1), ``(N, K)`` or ``(N, T, K)``, in the activations' dtype like the
        maps: Score-CAM's and Ablation-CAM's, computed from the scores (float32 under a float32 head), are
        cast to it (:func:`gradcam_ref._methods.given_weights_fields`).
      scores: the model's output for ``inputs``, e.g. ``(N, C)`` logits.
      targets: the explained classes, int64 NumPy ``(N,)`` or ``(N, T)``; None when the
        target was a callable.
      guided_backprop: with ``guided=True``, :math:`\\partial^{\\text{guided}} y^c / \\partial x`,
        the gradient of the score w.r.t. the input through guided ReLUs, ``(N, C, *S)`` (the
        input's shape) or ``(N, T, C, *S)``; else None.
      guided_grad_cam: with ``guided=True``, ``guided_grad_cam(guided_backprop, maps)``: the
        guided gradients times ``maps`` upsampled to the input, same shape; else None.
        :func:`gradcam_ref.guided_image` makes either displayable.
      method: the method's name (one of :data:`gradcam_ref.METHODS`), ``"grad-cam"`` by default.
      signed: the map before the method's final ReLU, the shape of ``maps``; None for Grad-CAM,
        whose signed map is ``gradcam_ref.cam(activations, weights)``.
      options: the method's options as ``(name, value)`` pairs (e.g. ``(("eps", 1e-7),)``).

    For Grad-CAM the signed map (before the ReLU) is ``gradcam_ref.cam(activations, weights)``.
    ``weights`` are None for methods without channel weights (HiResCAM, LayerCAM, the Eigen
    methods); ``gradients`` are None for Score-CAM and Ablation-CAM, which use none.
    """

    maps: Array
    activations: Array
    gradients: Array  # or None (Score-CAM, Ablation-CAM)
    weights: Array  # or None (methods without channel weights)
    scores: Array
    targets: np.ndarray | None
    guided_backprop: Array | None = None
    guided_grad_cam: Array | None = None
    method: str = "grad-cam"
    signed: Array | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_capture(
        cls,
        capture: Capture,
        fields: GradCamFields | None = None,
        *,
        method: str = "grad-cam",
        weights: Array | None = None,
        signed: Array | None = None,
        **options: Any,
    ) -> Explanation:
        """The explanation of what a backend captured: the method's equations applied.

        ``fields`` are ``grad_cam_fields(capture)`` when the backend computed them
        already (inside its own compiled program); else they are computed here. For another
        ``method`` the core's :func:`gradcam_ref._methods.method_fields` computes the weights and
        the signed map from the capture's ``(A, G)`` with ``options``; methods that need more
        than one capture (Score-CAM, Ablation-CAM, Smooth Grad-CAM++) pass their ``weights``
        (and, without channel weights, ``signed``) computed by :func:`explain`; those weights and their
        map come back in the activations' dtype (:func:`gradcam_ref._methods.given_weights_fields`).
        """
        check_method(method)
        if method == "grad-cam" and not options and weights is None:
            if fields is None:
                fields = grad_cam_fields(capture)
            return cls(
                maps=fields.maps,
                activations=capture.activations,
                gradients=capture.gradients,
                weights=fields.weights,
                scores=capture.scores,
                targets=capture.targets,
                guided_backprop=capture.guided_backprop,
                guided_grad_cam=fields.guided_grad_cam,
            )
        if weights is not None:  # in the activations' dtype, as the gradient methods' (given_weights_fields)
            xp, (a,) = as_float_arrays(activations=capture.activations)
            _, (w,) = as_float_arrays(weights=weights)
            same_library(activations=a, class_weights=w)
            weights, signed = given_weights_fields(xp, a, w)
        elif signed is None:
            y = method_target_scores(method, options, capture.scores, capture.targets)
            weights, signed = method_fields(method, capture.activations, capture.gradients, target_scores=y,
                                            **options)
        maps = relu_map(signed)
        guided = capture.guided_backprop
        ggc = None if guided is None else guided_grad_cam(
            guided, maps, spatial_rank=len(capture.activations.shape) - 2)
        return cls(
            maps=maps,
            activations=capture.activations,
            gradients=capture.gradients,
            weights=weights,
            scores=capture.scores,
            targets=capture.targets,
            guided_backprop=guided,
            guided_grad_cam=ggc,
            method=method,
            signed=signed,
            options=tuple(sorted(options.items())),
        )

    def heatmap(self, size: int | tuple[int, ...] | None = None, convention: str = "paper") -> Array:
        """The map post-processed as ``convention`` defines it, at ``size`` (e.g. the input's).

        ``"paper"`` (default): ReLU, half-pixel bilinear upsampling to ``size``, then per-map
        min-max into [0, 1]. ``"pytorch-grad-cam"``, ``"captum"``, ``"torchcam"`` and
        ``"tf-keras-vis"`` reproduce what those libraries return for the same model, layer,
        input and target; ``size=None`` keeps the layer's resolution. The steps and why each
        library differs: :func:`gradcam_ref.conventions.describe`, or ``gradcam-ref verify --explain LIB``.
        Shape ``(N, *size)`` (or ``(N, T, *size)``), in the library of ``maps``.
        """
        rank = len(self.activations.shape) - 2
        if self.method == "grad-cam":
            return postprocess(cam(self.activations, self.weights), convention, size=size, spatial_rank=rank)
        return postprocess(method_signed_map(self, convention), convention, size=size, spatial_rank=rank,
                           method=self.method)

    def numpy(self) -> Explanation:
        """A copy with every array as a float64 NumPy array on the host (targets stay int)."""
        convert = lambda x: None if x is None else np.array(to_numpy(x), dtype=np.float64)  # noqa: E731
        arrays: dict[str, Any] = {f.name: convert(getattr(self, f.name)) for f in dataclasses.fields(self)
                                  if f.name not in ("targets", "method", "options")}
        return dataclasses.replace(self, **arrays)


def explain(
    model: Any,
    inputs: Any,
    target: Target = None,
    *,
    layer: Any = None,
    backend: str | None = None,
    guided: bool = False,
    differentiable: bool | str = False,
    method: str = "grad-cam",
    **options: Any,
) -> Explanation:
    """Grad-CAM (or another CAM ``method``) of ``model`` on ``inputs`` at ``layer``, for ``target``.

    The backend (a name in ``gradcam_ref.backends.BACKENDS``: numpy, torch, jax, tensorflow) is
    picked from the types of ``model`` and ``inputs`` without importing any framework the caller
    has not imported; ``backend`` forces one. The backend runs the model and captures the layer's
    activations :math:`A`, the gradients :math:`\\partial y^c / \\partial A` and the scores; the
    core then computes :math:`\\alpha^c` (Eq. 1) and the map (Eq. 2), see
    :func:`gradcam_ref.grad_cam`. A backend that compiles whole programs (JAX, TensorFlow) runs
    the same core functions inside its program.

    Args:
      model: a model of a backend's kind: a ``backends.numpy_backend.Oracle``, a torch
        ``nn.Module``, a ``(features, head)`` pair, ...
      inputs: a batch ``(N, ...)`` in the model's library.
      target: ``None`` (the predicted class), an int, N ints, an int array ``(N, T)`` (T maps
        per example) or a callable ``scores -> (N,)`` for any differentiable output.
      layer: where to take :math:`A` (a name or module; the backend's default when None).
      backend: the backend's name, to override detection.
      guided: also compute guided backpropagation and Guided Grad-CAM (the Explanation's
        ``guided_backprop`` and ``guided_grad_cam``). The backend then runs one more forward
        pass, with autograd from the input, and a backward pass to the input.
      differentiable: False (default: inference, today's cost), ``"stop"`` or ``"full"``: the
        maps carry autograd to the model's parameters and input, for training through them
        (GAIN, :mod:`gradcam_ref.gain`). ``"stop"`` holds :math:`\alpha^c` (Eq. 1) constant, as
        GAIN does; ``"full"`` differentiates through it too (second order). Backends: torch,
        jax (the NumPy oracle has no autograd); the cost of each: docs/gain.md.
      method: one of :data:`gradcam_ref.METHODS`: ``"grad-cam"`` (default), ``"grad-cam++"``,
        ``"hirescam"``, ``"xgrad-cam"``, ``"layercam"``, ``"eigen-cam"``, ``"eigen-grad-cam"``,
        ``"smooth-grad-cam++"``, ``"fem"``, ``"score-cam"``, ``"ablation-cam"`` (docs/cam-family.md).
      **options: the method's options (:data:`METHOD_OPTIONS`: ``eps``, ``centre``, ``sign``, ``k``,
        ``n_samples``/``std``/``seed``, ``variant``, ``value``/``denominator``, ``batch_size``,
        ``max_n``);
        the rest are passed to the backend. Smooth Grad-CAM++'s ``seed`` draws the noise in the
        inputs' own layout, so a channels-last model (Keras) gets other noise at each pixel than a
        channels-first one with the same seed; to compare the two, pass the same draws as
        ``noise`` (each moved to its model's layout).

    Returns:
      An :class:`Explanation` holding ``maps`` and every intermediate.
    """
    from gradcam_ref import backends

    check_method(method)
    check_flag("guided", guided)
    chosen = backends.select(model, inputs, backend)
    if guided and not chosen.GUIDED:
        raise TypeError(f"guided=True: the {chosen.NAME} backend does not compute guided backpropagation")
    if differentiable_mode(differentiable, guided) is not None:
        if not chosen.DIFFERENTIABLE:
            raise TypeError(
                f"differentiable={differentiable!r}: the {chosen.NAME} backend has no autograd; "
                "use the torch or jax backend"
            )
        if method in ("score-cam", "ablation-cam"):
            raise ValueError(f"differentiable={differentiable!r} is for the gradient methods, not method={method!r}")
        options["differentiable"] = differentiable  # passed only when set: backends without it keep working
    ours = {k: options.pop(k) for k in list(options) if k in METHOD_OPTIONS[method]}
    if method == "grad-cam":
        return chosen.explain(model, inputs, target, layer=layer, guided=guided, **options)
    if method in ("score-cam", "ablation-cam"):
        if guided:
            raise ValueError(f"guided=True is for the gradient methods, not method={method!r}")
        return _explain_perturbation(chosen, model, inputs, target, layer, method, ours, options)
    capture = chosen.capture(model, inputs, target, layer=layer, guided=guided, **options)
    if method == "smooth-grad-cam++":
        return _explain_smooth(chosen, model, inputs, target, layer, capture, ours, options)
    return Explanation.from_capture(capture, method=method, **ours)


METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "grad-cam": (), "grad-cam++": ("eps", "variant"), "hirescam": (), "layercam": (),
    "xgrad-cam": ("eps",),
    "eigen-cam": ("centre", "sign"),
    "eigen-grad-cam": ("centre", "sign"),
    "fem": ("k",),
    "smooth-grad-cam++": ("n_samples", "std", "seed", "variant", "noise"),
    "score-cam": ("variant", "batch_size", "max_n"),
    "ablation-cam": ("value", "denominator", "batch_size"),
}
"""The keyword options of each method, taken out of ``explain``'s ``**options``."""


def _explain_smooth(chosen: Any, model: Any, inputs: Any, target: Target, layer: Any, capture: Capture,
                    ours: dict[str, Any], options: dict[str, Any]) -> Explanation:
    """Smooth Grad-CAM++: ``n_samples`` captures at ``inputs + N(0, std^2)`` noise (NumPy's
    generator seeded by ``seed``, drawn in the inputs' own shape and layout, or the given ``noise``
    draws), the clean capture's targets,
    then the core's reduction: the paper's, or torchcam's (``variant="torchcam"``: its weights,
    and the last noisy capture's activations in the map, as torchcam's hook keeps them)."""
    n, std, seed = ours.get("n_samples", 4), ours.get("std", 0.3), ours.get("seed", 0)
    variant, given = ours.get("variant", "paper"), ours.get("noise")
    check_choice("variant", variant, ("paper", "torchcam"))
    n = check_int("n_samples", n, 1, type_error=ValueError)
    check_nonnegative("std", std)
    seed = check_int("seed", seed, 0, none=True)
    if not is_array(inputs):
        inputs = np.asarray(inputs, dtype=np.float64)
    xp = namespace(inputs)
    if given is not None:
        expected = f"noise must be n >= 1 draws of the inputs' shape {shape_of(inputs)}"
        if isinstance(given, str) or not hasattr(given, "__iter__"):
            raise TypeError(f"{expected}, got {shown(given)}")
        given = list(given)
        if not all(hasattr(d, "shape") and hasattr(d, "dtype") for d in given):
            raise TypeError(f"{expected}, got items of types {sorted({type(d).__name__ for d in given})}")
        if not given or any(shape_of(d) != shape_of(inputs) for d in given):
            raise ValueError(f"{expected}, got shapes {[shape_of(d) for d in given]}")
        n = len(given)
    rng = np.random.default_rng(seed)
    targets = target if capture.targets is None else capture.targets
    gradients, last = [], capture
    for s in range(n):
        draw = std * rng.standard_normal(shape_of(inputs)) if given is None else given[s]
        noise = xp.asarray(draw, dtype=inputs.dtype, device=device_of(inputs))
        last = chosen.capture(model, inputs + noise, targets, layer=layer, **options)
        gradients.append(last.gradients)
    gx = namespace(capture.activations)
    recorded = {"n_samples": n, "std": std, "seed": seed} if given is None else {"n_samples": n, "noise": "given"}
    if variant == "torchcam":
        weights = torchcam_smooth_weights(capture.activations, gx.stack(gradients, axis=0))
        capture = Capture(last.activations, last.gradients, capture.scores, capture.targets)
        return Explanation.from_capture(capture, method="smooth-grad-cam++", weights=weights,
                                        variant=variant, **recorded)
    weights = _smooth_weights(gx, capture.activations, gx.stack(gradients, axis=0))
    return Explanation.from_capture(capture, method="smooth-grad-cam++", weights=weights, **recorded)


def _explain_perturbation(chosen: Any, model: Any, inputs: Any, target: Target, layer: Any, method: str,
                          ours: dict[str, Any], options: dict[str, Any]) -> Explanation:
    """Score-CAM and Ablation-CAM: the core makes the perturbed batches, the backend scores them."""
    # Score-CAM's copies are whole inputs: 8 per forward pass is the fastest per image on a CPU
    # (docs/benchmarks.md); Ablation-CAM's are activations through the end of the model only.
    batch_size = ours.pop("batch_size", 8 if method == "score-cam" else 32)
    batch_size = check_int("batch_size", batch_size, 1, type_error=ValueError)
    if method == "score-cam":
        variant = check_choice("variant", ours.get("variant", "paper"), SCORE_CAM_VARIANTS)
        check_int("max_n", ours.get("max_n"), 1, note=" (channels kept per example)", none=True, type_error=ValueError)

        shared: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # example -> (distinct channels, position of each)

        def count(a: Any, n: int) -> int:
            shared[n] = distinct_channels(a[n])
            return len(shared[n][0])

        def make(x: Any, a: Any, n: int, start: int, stop: int) -> Any:
            xp = namespace(a)
            channels = xp.asarray(shared[n][0][start:stop], device=device_of(a))
            masks = score_cam_masks(xp.take(a[n:n + 1], channels, axis=1), shape_of(x)[2:], variant=variant)[0]
            return x[n:n + 1] * xp.expand_dims(masks, axis=1)  # (stop - start, C, *S)

        where = "inputs"
    else:
        value = check_choice("value", ours.get("value", "zero"), ABLATION_VALUES)
        check_choice("denominator", ours.get("denominator", "score"), ABLATION_DENOMINATORS)

        def make(x: Any, a: Any, n: int, start: int, stop: int) -> Any:
            return ablated_activations(a, n, range(start, stop), value=value, chunk=int(batch_size))

        where = "activations"
    def scored(scores: Any) -> None:  # the targets checked before any perturbed copy is scored
        resolve_targets(target, scores)

    if method == "score-cam":  # channels with identical activations have identical masks: one run each
        a, scores, rows = chosen.perturb(model, inputs, make, layer=layer, where=where, batch_size=batch_size,
                                         count=count, scored=scored, **options)
        rows = _spread(rows, [shared[n][1] for n in range(shape_of(a)[0])])
    else:
        a, scores, rows = chosen.perturb(model, inputs, make, layer=layer, where=where, batch_size=batch_size,
                                         scored=scored, **options)
    targets = resolve_targets(target, scores)
    y = _target_scores(scores, targets)  # (N,) or (N, T)
    yk = _target_scores(rows, targets)  # (N, K) or (N, T, K)
    if method == "score-cam":
        if ours.get("variant") in ("official", "tf-keras-vis"):  # the class probability itself
            xp = namespace(rows)
            probabilities = xp.exp(rows - xp.max(rows, axis=-1, keepdims=True))
            probabilities = probabilities / xp.sum(probabilities, axis=-1, keepdims=True)
            weights = _target_scores(probabilities, targets)
            if ours.get("variant") == "official":  # the authors' code skips channels whose mask is flat
                weights = weights * _not_flat(a, yk)
        else:
            weights = score_cam_weights(yk)
        if ours.get("max_n") is not None:
            weights = weights * faster_score_cam_channels(a, ours["max_n"], like=weights)
    else:
        weights = ablation_cam_weights(y, yk, denominator=ours.get("denominator", "score"))
        if bool(namespace(y).any(y < 0)) and ours.get("denominator", "score") == "score":
            warnings.warn(
                "Ablation-CAM divides by the target score y^c, which is negative for some example: the "
                "paper's weights (y - y_k) / y then change sign; pass denominator='abs' to divide by |y|",
                NonPositiveScoreWarning, stacklevel=3)
    capture = Capture(a, None, scores, None if callable(targets) else targets)
    return Explanation.from_capture(capture, method=method, weights=weights, **ours)


def method_target_scores(method: str, options: dict[str, Any], scores: Any, targets: Any) -> Any:
    """:math:`y^c` ``(N,)`` or ``(N, T)`` where the method's variant needs them (Grad-CAM++'s
    ``variant="tf-keras-vis"``: its :math:`\\exp(y^c)`), else None."""
    if method != "grad-cam++" or options.get("variant") != "tf-keras-vis":
        return None
    if targets is None:
        raise ValueError("variant='tf-keras-vis' multiplies the weights by exp(y^c) of the target's score: "
                         "pass class targets (ints), not a callable")
    return _target_scores(scores, targets)


def faster_score_cam_channels(activations: Any, max_n: int, *, like: Any) -> Any:
    """1 for the channels Faster-ScoreCAM keeps, else 0, shaped and typed like ``like`` (``(N, K)`` or ``(N, T, K)``).

    tf-keras-vis 0.8.7's ``Scorecam(max_N=...)``: each example's ``max_n`` channels of largest
    spatial standard deviation (population; on a tie the lower channel first, as ``tf.math.top_k``),
    then the union over the *batch*: every example's map uses the channels any example chose.
    """
    k = shape_of(activations)[1]
    max_n = check_int("max_n", max_n, 1, k + 1, " (the layer's channels)", type_error=ValueError)
    host = np.asarray(to_numpy(activations), dtype=np.float64)
    spread = host.reshape(host.shape[0], k, -1).std(axis=-1)  # (N, K)
    chosen = np.argsort(-spread, axis=1, kind="stable")[:, :max_n]
    keep = np.zeros(k)
    keep[np.unique(chosen)] = 1.0
    xp = namespace(like)
    mask = xp.asarray(keep, dtype=like.dtype, device=device_of(like))
    return xp.broadcast_to(mask, shape_of(like))


def distinct_channels(activations: Any) -> tuple[np.ndarray, np.ndarray]:
    """The channels of one example's ``activations`` ``(K, *spatial)`` that differ bit for bit.

    Returns ``(channels, position)``: the first channel of each set of bit-identical channels,
    in increasing order, and for each of the K channels the index of its set in ``channels``.
    Score-CAM's mask of a channel depends on that channel alone, so identical channels (after a
    ReLU, typically the all-zero ones) give one masked input, scored once.
    """
    rows = np.ascontiguousarray(to_numpy(activations)).reshape(shape_of(activations)[0], -1)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))[:, 0]  # bytes: -0.0 != 0.0
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[np.reshape(inverse, -1)]


def _spread(rows: Any, positions: list[np.ndarray]) -> Any:
    """``rows[n, positions[n]]`` for each example n: ``(N, count, C)`` scores back to ``(N, K, C)``."""
    xp = namespace(rows)
    device = device_of(rows)
    return xp.stack([xp.take(rows[n], xp.asarray(p, device=device), axis=0) for n, p in enumerate(positions)])


def _target_scores(scores: Any, targets: Any) -> Any:
    """``scores`` ``(N, [M,] C)`` at the targets: ``(N, [M])``, ``(N, T, [M])``, or a callable's."""
    xp = namespace(scores)
    shape = shape_of(scores)
    if callable(targets):
        flat = xp.reshape(scores, (math.prod(shape[:-1]), shape[-1]))
        return xp.reshape(targets(flat), shape[:-1])
    index = np.asarray(targets)
    multi = index.ndim == 2
    index = index if multi else index[:, None]  # (N, T)
    if len(shape) == 3:  # (N, M, C): every one of the M rows at the T targets, as (N, M, T)
        # a writable copy: torch warns on (and may write into) a read-only broadcast view
        index = np.array(np.broadcast_to(index[:, None, :], (shape[0], shape[1], index.shape[1])))
    out = xp.take_along_axis(scores, xp.asarray(index, device=device_of(scores)), axis=-1)  # (N, [M,] T)
    if len(shape) == 3:
        out = xp.permute_dims(out, (0, 2, 1))  # (N, T, M)
    return out if multi else out[:, 0]


def _not_flat(a: Any, like: Any) -> Any:
    """1 for channels whose activations are not constant over space, else 0 (the official Score-CAM skips them)."""
    xp = namespace(a)
    flat = xp.reshape(a, (*shape_of(a)[:2], -1))
    keep = xp.astype(xp.max(flat, axis=-1) > xp.min(flat, axis=-1), like.dtype)
    return keep if like.ndim == keep.ndim else xp.expand_dims(keep, axis=1)
