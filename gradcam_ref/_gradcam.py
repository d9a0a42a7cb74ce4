r"""Grad-CAM's equations (Selvaraju et al.), CAM (Zhou et al.) and Grad-CAM++ on arrays.

Notation (the paper's): a layer gives K feature maps :math:`A^k` over Z spatial positions;
:math:`y^c` is the score of target c *before* the softmax. Arrays are channels-first,
``activations`` ``(N, K, *spatial)`` with any number of spatial axes; ``gradients`` holds
:math:`\partial y^c / \partial A` with the same shape, or ``(N, T, K, *spatial)`` for T targets
per example (the activations are shared, the maps come out as ``(N, T, *spatial)``).

References:
  Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization", ICCV 2017 / IJCV 2020, https://arxiv.org/abs/1610.02391
  Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016,
  https://arxiv.org/abs/1512.04150
  Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
  Networks", WACV 2018, https://arxiv.org/abs/1710.11063
"""

from __future__ import annotations

import math
from typing import Any

from gradcam_ref import _arrays as arrays
from gradcam_ref._arrays import Array


@arrays.quiet_numpy
def neuron_importance(gradients: Array) -> Array:
    r"""Neuron importance weights, Eq. 1 of Grad-CAM: the spatial mean of the gradients.

    .. math::

        \alpha_k^c = \frac{1}{Z} \sum_i \sum_j \frac{\partial y^c}{\partial A^k_{ij}}

    with Z the number of spatial positions (``u * v`` for images; the product of all spatial
    sizes for any spatial rank).

    Args:
      gradients: :math:`\partial y^c / \partial A^k`, shape ``(N, K, *spatial)``.

    Returns:
      :math:`\alpha^c`, shape ``(N, K)``: one weight per example and feature map.

    Example:
      >>> import numpy as np
      >>> g = np.array([[[[1.0, 2.0], [3.0, 6.0]]]])  # N=1, K=1, 2x2: Z = 4
      >>> neuron_importance(g)
      array([[3.]])
    """
    xp, (g,) = arrays.as_float_arrays(gradients=gradients)
    arrays.check_feature_maps("gradients", g)
    alpha = _spatial_mean(xp, g, lead=2)
    arrays.check_finite(alpha, "neuron_importance", gradients=g)
    return alpha


@arrays.quiet_numpy
def cam(activations: Array, class_weights: Array) -> Array:
    r"""Class Activation Map of Zhou et al.: the feature maps weighted by the classifier.

    .. math::

        M^c = \sum_k w_k^c A^k

    No ReLU and no scaling. For conv -> global average pool -> linear networks, with
    ``class_weights`` the linear layer's row of class c, Grad-CAM's
    :math:`\alpha_k^c = w_k^c / Z` and so ``grad_cam == ReLU(cam) / Z``.

    Args:
      activations: :math:`A`, shape ``(N, K, *spatial)``.
      class_weights: :math:`w^c`, shape ``(K,)`` (one class for all examples), ``(N, K)``
        (one class per example) or ``(N, T, K)`` (T classes per example).

    Returns:
      :math:`M^c`, shape ``(N, *spatial)``, or ``(N, T, *spatial)`` for ``(N, T, K)`` weights.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # N=1, K=2, 1x2
      >>> cam(a, np.array([3.0, -1.0]))
      array([[[ 3., -2.]]])
    """
    xp, (a, w) = arrays.as_float_arrays(activations=activations, class_weights=class_weights)
    arrays.check_feature_maps("activations", a)
    n, k = arrays.shape_of(a)[:2]
    expected = {1: (k,), 2: (n, k)}.get(w.ndim, (n, arrays.shape_of(w)[1] if w.ndim == 3 else "T", k))
    if arrays.shape_of(w) != expected or 0 in arrays.shape_of(w):
        raise ValueError(
            f"class_weights must have shape (K,) = ({k},), (N, K) = ({n}, {k}) "
            f"or (N, T, K) = ({n}, T, {k}) to match activations {arrays.shape_of(a)}, "
            f"got shape {arrays.shape_of(w)}"
        )
    maps = _weighted_sum(xp, a, w)
    arrays.check_finite(maps, "cam", activations=a, class_weights=w)
    return maps


def grad_cam(activations: Array, gradients: Array, *, relu: bool = True) -> Array:
    r"""Grad-CAM localisation map, Eq. 1 and Eq. 2 of Selvaraju et al.

    .. math::

        \alpha_k^c = \frac{1}{Z} \sum_i \sum_j \frac{\partial y^c}{\partial A^k_{ij}}
        \qquad
        L^c_{\text{Grad-CAM}} = \mathrm{ReLU}\Big(\sum_k \alpha_k^c A^k\Big)

    The ReLU keeps the positions whose features raise :math:`y^c`; ``relu=False`` returns the
    signed map, whose negative part is what the ReLU removes. A *counterfactual* map (the
    regions that speak against c; Sec. 3.3 of the paper, "Counterfactual Explanations") is the
    Grad-CAM of the negated score: pass ``-gradients`` (or, in :func:`gradcam_ref.explain`, a
    target callable returning ``-scores[:, c]``).

    Args:
      activations: :math:`A`, shape ``(N, K, *spatial)``.
      gradients: :math:`\partial y^c / \partial A`, shape ``(N, K, *spatial)``, or
        ``(N, T, K, *spatial)`` for T targets per example.
      relu: apply the final ReLU of Eq. 2.

    Returns:
      :math:`L^c`, shape ``(N, *spatial)`` (or ``(N, T, *spatial)``), at the layer's
      resolution; :func:`upsample` brings it to the image's.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, K=2, 1x2
      >>> g = np.array([[[[1.0, 1.0]], [[-1.0, -3.0]]]])  # alpha = [1, -2]
      >>> grad_cam(a, g, relu=False)
      array([[[-5.,  2.]]])
      >>> grad_cam(a, g)
      array([[[0., 2.]]])
    """
    arrays.check_flag("relu", relu)
    _, maps = grad_cam_parts(activations, gradients)
    return relu_map(maps) if relu else maps


@arrays.quiet_numpy
def grad_cam_parts(activations: Array, gradients: Array) -> tuple[Array, Array]:
    """``(alpha, signed_map)``: the two halves of :func:`grad_cam`, computed once each.

    ``alpha`` is ``(N, K)`` or ``(N, T, K)``; the map (before the ReLU) ``(N, *spatial)`` or
    ``(N, T, *spatial)``. Used by :func:`grad_cam` and :func:`gradcam_ref.explain`.
    """
    xp, (a, g) = arrays.as_float_arrays(activations=activations, gradients=gradients)
    arrays.check_feature_maps("activations", a)
    multi = arrays.check_gradients_match(a, g)
    lead = 3 if multi else 2
    alpha = _plain_mean(xp, g, lead)
    maps = _weighted_sum(xp, a, alpha)
    # One read-back when all is well: a non-finite alpha_k makes every value of its map
    # non-finite (inf * x, NaN * x and inf - inf never are finite), so finite maps prove
    # finite weights. Else the mean is redone safely (a sum that overflowed although the mean
    # fits) and the culprit named.
    if arrays.all_finite(maps) is False:
        alpha = _spatial_mean(xp, g, lead)
        maps = _weighted_sum(xp, a, alpha)
        arrays.check_finite(alpha, "grad_cam", gradients=g)
        arrays.check_finite(maps, "grad_cam", activations=a, gradients=g)
    return alpha, maps


def relu_map(maps: Array) -> Array:
    """The ReLU of Eq. 2, ``max(maps, 0)``, keeping the array's library and autograd graph."""
    return _relu(arrays.namespace(maps), maps)


@arrays.quiet_numpy
def grad_cam_plus_plus(
    activations: Array,
    gradients: Array,
    *,
    relu: bool = True,
    eps: float = 0.0,
    variant: str = "paper",
    target_scores: Array | None = None,
) -> Array:
    r"""Grad-CAM++ map in the closed form of Chattopadhay et al. (Eq. 19 of the paper).

    .. math::

        a_{ij}^{kc} = \frac{g_{ij}^2}{2 g_{ij}^2 + \sum_{ab} A^k_{ab}\, g_{ij}^3}, \quad
        w_k^c = \sum_{ij} a_{ij}^{kc}\, \mathrm{ReLU}(g_{ij}), \quad
        L^c = \mathrm{ReLU}\Big(\sum_k w_k^c A^k\Big)

    with :math:`g = \partial S^c / \partial A^k` the gradient of the logit :math:`S^c`
    (``gradients``) and :math:`a_{ij}^{kc} = 0` where the denominator is 0. The products
    :math:`a_{ij}^{kc}\,\mathrm{ReLU}(g_{ij})` are computed without powers of g that could
    overflow or underflow (``plus_plus_weights``).

    The closed form assumes the explained score is the exponential of the logit,
    :math:`Y^c = \exp(S^c)`: only then are the second and third derivatives of :math:`Y^c`
    the powers :math:`\exp(S^c) g^2` and :math:`\exp(S^c) g^3`, whose common factor
    cancels in :math:`a`. The paper's :math:`\mathrm{ReLU}(\partial Y^c/\partial A)` is
    :math:`\exp(S^c)\,\mathrm{ReLU}(g)`; like pytorch-grad-cam and torchcam we drop the
    positive per-map constant :math:`\exp(S^c)`, which no normalisation can see. There is no
    1/Z here: the weights are sums, not means.

    Args:
      activations: :math:`A`, shape ``(N, K, *spatial)``.
      gradients: :math:`g = \partial S^c / \partial A`, shape ``(N, K, *spatial)`` or
        ``(N, T, K, *spatial)``.
      relu: apply the final ReLU.
      eps: added to the denominator of :math:`a_{ij}^{kc}` (pytorch-grad-cam: 1e-6; the paper: 0).
      variant: ``"paper"`` (above), ``"tf-keras-vis"`` (tf-keras-vis 0.8.7's
        ``GradcamPlusPlus``: the factor :math:`\exp(y^c)` kept and each channel's
        :math:`a^{kc}` divided by their spatial sum, :func:`tf_keras_vis_plus_plus_weights`) or
        ``"torchcam"`` (torchcam 0.5.0's ``GradCAMpp``: :math:`w_k^c = \sum_{ij} g_{ij}^2\,
        \mathrm{ReLU}(g_{ij}) = \sum_{ij} \mathrm{ReLU}(g_{ij})^3`, since its in-place division
        by the denominator acts on a copy: ``alpha[mask].div_``, boolean indexing copies).
      target_scores: :math:`y^c`, ``(N,)`` or ``(N, T)``: needed by ``"tf-keras-vis"`` only.

    Returns:
      The map, shape ``(N, *spatial)`` (or ``(N, T, *spatial)``).

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 1.0]]]])  # N=1, K=1, 1x2: sum A = 2
      >>> g = np.array([[[[1.0, 0.0]]]])  # a = [1 / (2 + 2), 0], w = 1/4
      >>> grad_cam_plus_plus(a, g)
      array([[[0.25, 0.25]]])
    """
    arrays.check_flag("relu", relu)
    xp, (a, g) = arrays.as_float_arrays(activations=activations, gradients=gradients)
    arrays.check_feature_maps("activations", a)
    arrays.check_gradients_match(a, g)
    weights = _plus_plus_variant_weights(xp, a, g, eps, variant, target_scores)
    maps = _weighted_sum(xp, a, weights)
    arrays.check_finite(maps, "grad_cam_plus_plus", activations=a, gradients=g)
    return _relu(xp, maps) if relu else maps


@arrays.quiet_numpy
def plus_plus_weights(xp: Any, a: Array, g: Array, *, eps: float = 0.0, samples: bool = False) -> Array:
    r"""Grad-CAM++'s weights :math:`w_k^c = \sum_{ij} a_{ij}^{kc}\, \mathrm{ReLU}(D^1_{ij})`.

    :math:`a_{ij}^{kc} = D^2_{ij} / (2 D^2_{ij} + S_k D^3_{ij} + \epsilon)` with
    :math:`S_k = \sum_{ab} A^k_{ab}` and :math:`D^p = g^p` (Grad-CAM++), or with ``samples``
    (a leading axis of n noisy gradients :math:`g_s`, Smooth Grad-CAM++)
    :math:`D^p = \frac{1}{n} \sum_s g_s^p`. Computed in units of
    :math:`c = \max_s |g_s|` per position (:math:`u_s = g_s / c`), as
    :math:`\bar{u^2}\,\mathrm{ReLU}(\bar u) / (2 \bar{u^2}/c + S_k \bar{u^3} + \epsilon/c^3)`: the
    same number, with no power of g that could overflow (``2 g^2 + S g^3`` does for float16
    gradients of about 40, float64 ones of 1e103) or underflow. A zero denominator becomes
    infinite (term 0), which keeps autograd free of NaN. float16 and bfloat16 inputs are computed
    in float32 (:func:`gradcam_ref._arrays.widen_half`) and the weights cast back: in half
    precision :math:`2/c` overflows for gradients below 3e-5, :math:`c^3` underflows for gradients
    below 4e-3 (making :math:`\epsilon/c^3` infinite for pytorch-grad-cam's 1e-6) and :math:`S_k`
    passes 65504, each zeroing (or refusing) weights that float16 holds. Returns ``(N, K)`` or ``(N, T, K)``.
    """
    dtype = g.dtype
    a, g = arrays.widen_half(xp, a, g)
    spatial = tuple(range(2, a.ndim))
    sum_a = xp.sum(a, axis=spatial, keepdims=True)  # (N, K, 1, ...)
    arrays.check_finite(sum_a, "grad_cam_plus_plus (the sum of each activation map)", activations=a)
    gs = g if samples else xp.expand_dims(g, axis=0)  # (n, N, [T,] K, *spatial)
    if gs.ndim == a.ndim + 2:
        sum_a = xp.expand_dims(sum_a, axis=1)  # (N, 1, K, 1, ...)
    c = xp.max(xp.abs(gs), axis=0)
    c = xp.where(c > 0, c, xp.ones_like(c))
    u = gs / c
    u2 = u * u
    d1, d2, d3 = xp.mean(u, axis=0), xp.mean(u2, axis=0), xp.mean(u2 * u, axis=0)
    denominator = 2 * d2 / c + sum_a * d3
    if eps:  # (0 / c^3 would be 0 / 0 where c^3 underflows)
        denominator = denominator + eps / (c * c * c)
    safe = xp.where(denominator != 0, denominator, xp.full_like(denominator, math.inf))
    terms = d2 * _relu(xp, d1) / safe
    weights = xp.sum(terms, axis=tuple(range(terms.ndim - len(spatial), terms.ndim)))
    return weights if weights.dtype == dtype else xp.astype(weights, dtype)


PLUS_PLUS_VARIANTS = ("paper", "tf-keras-vis", "torchcam")
"""The variants of Grad-CAM++'s weights: the paper's closed form, tf-keras-vis 0.8.7's and torchcam 0.5.0's."""


def _plus_plus_variant_weights(xp: Any, a: Array, g: Array, eps: float, variant: str,
                               target_scores: Array | None) -> Array:
    """Grad-CAM++'s weights of ``variant`` (checked finite), for :func:`grad_cam_plus_plus` and ``method_fields``."""
    arrays.check_choice("variant", variant, PLUS_PLUS_VARIANTS)
    arrays.check_nonnegative("eps", eps)
    if variant == "paper":
        if target_scores is not None:
            raise ValueError("target_scores is for variant='tf-keras-vis' (its exp(y^c) factor); "
                             "the paper variant drops that factor: pass target_scores=None")
        weights = plus_plus_weights(xp, a, g, eps=eps)
        arrays.check_finite(weights, "grad_cam_plus_plus", activations=a, gradients=g)
        return weights
    if eps:
        raise ValueError(f"eps is for variant='paper' (pytorch-grad-cam's 1e-6); variant={variant!r} has none, "
                         f"got eps={eps!r}")
    if variant == "torchcam":
        if target_scores is not None:
            raise ValueError("target_scores is for variant='tf-keras-vis' (its exp(y^c) factor); "
                             "variant='torchcam' has none: pass target_scores=None")
        spatial = tuple(range(g.ndim - (a.ndim - 2), g.ndim))
        positive = _relu(xp, g)
        weights = xp.sum(positive * positive * positive, axis=spatial)
        arrays.check_finite(weights, "grad_cam_plus_plus", gradients=g)
        return weights
    if target_scores is None:
        raise ValueError("variant='tf-keras-vis' multiplies the weights by exp(y^c): pass target_scores, "
                         "the target scores y^c of shape (N,) or (N, T)")
    return tf_keras_vis_plus_plus_weights(a, g, target_scores)


@arrays.quiet_numpy
def tf_keras_vis_plus_plus_weights(activations: Array, gradients: Array, target_scores: Array) -> Array:
    r"""tf-keras-vis 0.8.7's ``GradcamPlusPlus`` weights, read from its code (gradcam_plus_plus.py).

    .. math::

        a_{ij}^{kc} = \frac{g_{ij}^2}{2 g_{ij}^2 + S_k\, g_{ij}^3} = \frac{1}{2 + S_k\, g_{ij}}, \quad
        w_k^c = e^{y^c}\, \frac{\sum_{ij} a_{ij}^{kc}\, \mathrm{ReLU}(g_{ij})}{\sum_{ij} a_{ij}^{kc}}

    with :math:`S_k = \sum_{ab} A^k_{ab}`, :math:`g = \partial y^c / \partial A` and
    :math:`a_{ij}^{kc} = 0` where :math:`g_{ij} = 0` (or :math:`2 + S_k g_{ij} = 0`, where
    tf-keras-vis divides by 0). Two departures from :func:`grad_cam_plus_plus`'s closed form: it
    keeps the paper's :math:`\mathrm{ReLU}(\partial Y^c / \partial A) = e^{y^c}\,\mathrm{ReLU}(g)`
    of :math:`Y^c = \exp(y^c)` (one positive factor per map, seen only through the epsilon of its
    min-max), and it divides each channel's :math:`a^{kc}` by their spatial sum (a sum of 0 is
    left as it is): a per-channel factor that changes the map's shape. tf-keras-vis computes
    :math:`e^{y^c} g^p` for p = 1, 2, 3, whose :math:`e^{y^c}` cancels in :math:`a`; here
    :math:`a` is formed without it, so no power of g can overflow. Any per-channel factor of
    :math:`a` cancels in the ratio too: :math:`S_k g` and the sums are formed on :math:`S_k`,
    :math:`a` and :math:`g` divided by powers of two (exact: the same bits wherever nothing
    over- or underflows), so that an :math:`S_k g` past the largest number leaves the weight, a
    weighted mean of :math:`\mathrm{ReLU}(g)`, as it is (it came out 0). float16 and bfloat16
    inputs are computed in float32 and the weights cast back.

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      gradients: :math:`g`, ``(N, K, *spatial)`` or ``(N, T, K, *spatial)``.
      target_scores: :math:`y^c`, ``(N,)`` or ``(N, T)``.

    Returns:
      :math:`w^c`, ``(N, K)`` or ``(N, T, K)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 1.0]]]])  # S = 2
      >>> g = np.array([[[[1.0, -0.25]]]])  # a = [1/4, 1/(2 - 0.5)] = [1/4, 2/3]
      >>> tf_keras_vis_plus_plus_weights(a, g, np.array([0.0])).round(6)  # (1/4 * 1) / (1/4 + 2/3)
      array([[0.272727]])
    """
    xp, (a, g, y) = arrays.as_float_arrays(activations=activations, gradients=gradients, target_scores=target_scores)
    arrays.check_feature_maps("activations", a)
    multi = arrays.check_gradients_match(a, g)
    lead = 3 if multi else 2
    if tuple(arrays.shape_of(y)) != tuple(arrays.shape_of(g)[:lead - 1]):
        raise ValueError(f"target_scores must have shape {tuple(arrays.shape_of(g)[:lead - 1])} (one per map), "
                         f"got {tuple(arrays.shape_of(y))}")
    spatial = tuple(range(lead, g.ndim))
    dtype = g.dtype
    a, g, y = arrays.widen_half(xp, a, g, y)
    # g reaches the weights through 1 / (2 + S g), which sends an infinite g to 0: checked itself
    arrays.check_finite(g, "tf_keras_vis_plus_plus_weights", gradients=g)
    s = xp.sum(a, axis=tuple(range(2, a.ndim)), keepdims=True)  # (N, K, 1, ...)
    arrays.check_finite(s, "tf_keras_vis_plus_plus_weights (the sum of each activation map)", activations=a)
    if multi:
        s = xp.expand_dims(s, axis=1)
    # (2 + S g) / t with t = 2^e >= |S| (at least 1): |S / t| < 4, so S g / t overflows only for |g| > max / 4
    t = xp.maximum(arrays.power_of_two_at_least(xp, xp.abs(s)), xp.ones_like(s))
    denominator = 2 / t + (s / t) * g
    defined = (g != 0) & (denominator != 0)
    # alpha = a t m with m = 2^e >= the smallest |2 + S g| / t: |alpha| < 2, so no sum below overflows
    smallest = xp.min(xp.where(defined, xp.abs(denominator), xp.full_like(denominator, math.inf)),
                      axis=spatial, keepdims=True)
    m = arrays.power_of_two_at_least(xp, smallest)
    alpha = xp.where(defined, m / xp.where(defined, denominator, xp.ones_like(denominator)), xp.zeros_like(g))
    total = xp.sum(alpha, axis=spatial)
    positive = _relu(xp, g)
    p = arrays.power_of_two_at_least(xp, xp.max(positive, axis=spatial, keepdims=True))  # ReLU(g) / p < 4
    numerator = xp.sum(alpha * (positive / p), axis=spatial)
    zero = total == 0  # a sum of 0 is left as it is: the numerator without alpha's factor t m
    unscaled = numerator / xp.reshape(m, arrays.shape_of(m)[:lead]) / xp.reshape(t, arrays.shape_of(t)[:lead])
    mean = xp.where(zero, unscaled, numerator / xp.where(zero, xp.ones_like(total), total))
    mean = xp.reshape(p, arrays.shape_of(total)) * mean
    scale = xp.exp(y)
    if arrays.all_finite(scale) is False and arrays.all_finite(y) is not False:
        raise ValueError(
            f"target_scores: exp(y^c) overflows {y.dtype} (largest score {float(xp.max(y)):.6g}); tf-keras-vis's "
            "GradcamPlusPlus returns NaN maps there")
    weights = xp.expand_dims(scale, axis=-1) * mean
    weights = weights if weights.dtype == dtype else xp.astype(weights, dtype)
    arrays.check_finite(weights, "tf_keras_vis_plus_plus_weights", activations=a, gradients=g, target_scores=y)
    return weights


def _spatial_mean(xp, x: Array, lead: int) -> Array:
    r"""Mean over every axis after the first ``lead`` ones, as one contiguous reduction.

    A sum that overflows although the mean fits (values near the dtype's largest) is redone as
    :math:`m \cdot \mathrm{mean}(x / m)` with :math:`m = \max |x|`, which cannot exceed
    :math:`m`; that second pass runs only then (the first result is checked when it can be read:
    not under ``jax.jit``).
    """
    shape = arrays.shape_of(x)
    z = math.prod(shape[lead:])
    flat = xp.reshape(x, shape[:lead] + (z,))
    mean = xp.mean(flat, axis=-1)
    if z > 1 and arrays.all_finite(mean) is False and arrays.all_finite(flat) is True:
        scale = xp.max(xp.abs(flat), axis=-1, keepdims=True)
        scale = xp.where(scale > 0, scale, xp.ones_like(scale))
        return scale[..., 0] * xp.mean(flat / scale, axis=-1)
    return mean


def _plain_mean(xp, x: Array, lead: int) -> Array:
    """Mean over every axis after the first ``lead`` ones, unchecked (:func:`_spatial_mean` checks)."""
    shape = arrays.shape_of(x)
    return xp.mean(xp.reshape(x, shape[:lead] + (math.prod(shape[lead:]),)), axis=-1)


def _weighted_sum(xp, a: Array, w: Array) -> Array:
    """``sum_k w[..., k] * a[:, k]`` as one batched matmul: no (N, K, *spatial) temporary.

    ``a`` is ``(N, K, *spatial)``; ``w`` is ``(K,)``, ``(N, K)`` or ``(N, T, K)``.
    ``a`` and ``w`` share one dtype (``as_float_arrays``), so the ``@`` operator needs none of
    ``matmul``'s promotion wrappers.
    """
    n, k, *spatial = arrays.shape_of(a)
    a3 = xp.reshape(a, (n, k, math.prod(spatial)))  # (N, K, Z)
    if w.ndim == 1:
        w = xp.broadcast_to(w, (n, k))
    if w.ndim == 2:
        return xp.reshape(xp.reshape(w, (n, 1, k)) @ a3, (n, *spatial))
    return xp.reshape(w @ a3, (n, arrays.shape_of(w)[1], *spatial))  # (N, T, K) @ (N, K, Z)


def _relu(xp, x: Array) -> Array:
    return xp.where(x > 0, x, 0.0)  # +0.0 where x <= 0 (also for x = -0.0)
