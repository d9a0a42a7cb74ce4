r"""The CAM family beyond Grad-CAM, as functions of the layer's activations and gradients.

Same layout as :mod:`gradcam_ref._gradcam`: ``activations`` :math:`A` ``(N, K, *spatial)``;
``gradients`` :math:`G = \partial y^c / \partial A` of the same shape, or ``(N, T, K, *spatial)``
for T targets per example (maps then ``(N, T, *spatial)``). Every function is written once
against the array API (NumPy float64 is the reference; torch and JAX arrays stay what they are).

Gradient methods are one weight or elementwise function of ``(A, G)`` each; the perturbation
methods (Score-CAM, Ablation-CAM) split into pure halves here (the masks or ablated activations
to score, and the reduction of the scores to weights) while a backend does the scoring
(``perturb`` in the ``Backend`` Protocol of ``gradcam_ref.backends._contract``). :data:`METHODS` lists every name
:func:`gradcam_ref.explain` accepts; :func:`method_fields` is the dispatch from a name to maps.
Equations, papers and each library's deviations: the functions' docstrings and docs/cam-family.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from gradcam_ref._arrays import (
    Array,
    all_finite,
    as_float_arrays,
    check_choice,
    check_feature_maps,
    check_finite,
    check_flag,
    check_gradients_match,
    check_int,
    check_nonnegative,
    check_positive,
    check_spatial_rank,
    device_of,
    namespace,
    power_of_two_at_least,
    quiet_numpy,
    same_library,
    shape_of,
    shown,
    to_numpy,
    widen_half,
)
from gradcam_ref._gradcam import _plus_plus_variant_weights, _relu, _weighted_sum, grad_cam_parts, plus_plus_weights
from gradcam_ref._postprocess import _eighth_where_huge
from gradcam_ref._resample import KERNELS, parse_size, resize

GRADIENT_METHODS = ("grad-cam", "grad-cam++", "hirescam", "xgrad-cam", "layercam", "eigen-cam",
                    "eigen-grad-cam", "smooth-grad-cam++", "fem")
"""Methods computed from one capture of ``(A, G)`` (Smooth Grad-CAM++: several, averaged; Eigen-CAM
and FEM read A only)."""

PERTURBATION_METHODS = ("score-cam", "ablation-cam")
"""Methods whose weights come from re-scoring the model (a backend's ``rescore``)."""

METHODS = GRADIENT_METHODS + PERTURBATION_METHODS
"""Every method name :func:`gradcam_ref.explain` accepts."""

FUSION_RULES = ("mean", "max", "layercam", "torchcam")

_METHOD_LIST = list(METHODS)  # as the error lists them


def check_method(method: str) -> str:
    """``method`` if it is a known name; else a ValueError listing the known ones."""
    return check_choice("method", method, _METHOD_LIST)


# --- gradient methods -----------------------------------------------------------------------


@quiet_numpy
def hires_cam(activations: Array, gradients: Array, *, relu: bool = True) -> Array:
    r"""HiResCAM (Draelos & Carin, arXiv 2011.08891): the gradients times the activations.

    .. math::

        L^c_{\text{HiResCAM}} = \mathrm{ReLU}\Big(\sum_k G^k \odot A^k\Big)

    No averaging of the gradients: each position keeps its own gradient, so the map is the
    part of the score each position contributes when the head is linear in :math:`A`. When
    :math:`G^k` is constant over the positions (a GAP head), :math:`G^k = \alpha^c_k` and the
    map equals Grad-CAM's. ``relu=False`` gives the signed map (the paper shows both).

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      gradients: :math:`G`, ``(N, K, *spatial)`` or ``(N, T, K, *spatial)``.
      relu: apply the final ReLU.

    Returns:
      ``(N, *spatial)`` or ``(N, T, *spatial)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, K=2, 1x2
      >>> g = np.array([[[[2.0, 0.0]], [[-1.0, 5.0]]]])
      >>> hires_cam(a, g, relu=False)  # [1*2 + 3*(-1), 2*0 + 0*5]
      array([[[-1.,  0.]]])
    """
    check_flag("relu", relu)
    xp, (a, g) = as_float_arrays(activations=activations, gradients=gradients)
    maps = _elementwise_sum(xp, a, g, "hires_cam")
    return _relu(xp, maps) if relu else maps


@quiet_numpy
def xgrad_cam_weights(activations: Array, gradients: Array, *, eps: float = 0.0) -> Array:
    r"""XGrad-CAM's weights (Fu et al., BMVC 2020, arXiv 2008.02312, Eq. 8).

    .. math::

        \alpha_k^c = \frac{\sum_{ij} G^k_{ij} A^k_{ij}}{\sum_{ij} A^k_{ij} + \varepsilon}

    ``eps=0`` (the paper): where :math:`\sum_{ij} A^k_{ij} = 0` the weight is defined as 0.
    After a ReLU that happens only when :math:`A^k = 0` everywhere, whose term
    :math:`\alpha_k A^k` is 0 whatever the weight; for signed activations summing to 0 the
    ratio is undefined and the channel is left out (weight 0), never NaN. pytorch-grad-cam adds
    ``eps=1e-7``, torchcam ``eps=1e-8`` (the weight is then :math:`\sum GA / \varepsilon`,
    which can be huge, for such channels).

    The sums may pass the dtype's largest number although the ratio fits: float16 and bfloat16
    inputs are summed in float32 (weights cast back), and where a float32 or float64 sum
    overflows, the ratio is redone on :math:`A^k` and :math:`G^k` divided by powers of two at least
    their largest magnitudes (exact; :math:`A`'s cancels in the ratio). That second pass runs only
    then, so only a weight beyond the largest number raises.

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      gradients: :math:`G`, ``(N, K, *spatial)`` or ``(N, T, K, *spatial)``.
      eps: added to the denominator.

    Returns:
      :math:`\alpha^c`, ``(N, K)`` or ``(N, T, K)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # channel 1 is all zero
      >>> g = np.array([[[[2.0, 6.0]], [[1.0, 1.0]]]])
      >>> xgrad_cam_weights(a, g)  # (1*2 + 3*6) / 4 = 5; 0/0 -> 0
      array([[5., 0.]])
    """
    xp, (a, g) = as_float_arrays(activations=activations, gradients=gradients)
    check_feature_maps("activations", a)
    multi = check_gradients_match(a, g)
    check_nonnegative("eps", eps)
    dtype = a.dtype
    a, g = widen_half(xp, a, g)
    weights, denominator = _xgrad_ratio(xp, a, g, multi, eps)
    # One read-back when all is well; else a sum overflowed (or the inputs hold NaN or Inf).
    if all_finite(weights, denominator) is False:
        pa = power_of_two_at_least(xp, xp.max(xp.abs(_flat(xp, a, 2)), axis=-1))  # (N, K)
        pg = power_of_two_at_least(xp, xp.max(xp.abs(_flat(xp, g, g.ndim - a.ndim + 2)), axis=-1))
        shape = (*shape_of(a)[:2], *(1,) * (a.ndim - 2))
        ratio, _ = _xgrad_ratio(xp, a / xp.reshape(pa, shape), g / xp.reshape(pg, shape_of(pg) + shape[2:]), multi,
                                eps / pa)
        weights = pg * ratio
        check_finite(weights, "xgrad_cam_weights", activations=a, gradients=g)
    if weights.dtype != dtype:  # half precision: the float32 weights may exceed its range
        weights = xp.astype(weights, dtype)
        check_finite(weights, "xgrad_cam_weights", activations=a, gradients=g)
    return weights


def _xgrad_ratio(xp: Any, a: Array, g: Array, multi: bool, eps: Any) -> tuple[Array, Array]:
    """``(sum G A / (sum A + eps), sum A + eps)`` of :func:`xgrad_cam_weights`, 0 where the denominator is 0."""
    numerator = _spatial_sum(xp, g * (xp.expand_dims(a, axis=1) if multi else a), 3 if multi else 2)
    denominator = _spatial_sum(xp, a, 2) + eps
    if multi:
        denominator = xp.expand_dims(denominator, axis=1)
    nonzero = denominator != 0
    weights = xp.where(nonzero, numerator / xp.where(nonzero, denominator, xp.ones_like(denominator)),
                       xp.zeros_like(numerator))
    return weights, denominator


def xgrad_cam(activations: Array, gradients: Array, *, relu: bool = True, eps: float = 0.0) -> Array:
    r"""XGrad-CAM map: :math:`\mathrm{ReLU}(\sum_k \alpha_k^c A^k)` with :func:`xgrad_cam_weights`.

    On a GAP head, :math:`G^k = w^c_k / Z` at every position, so :math:`\alpha_k^c = w^c_k / Z`
    (for channels with :math:`\sum A^k \ne 0`) and the map equals Grad-CAM's.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 3.0]]]])
      >>> xgrad_cam(a, np.array([[[[2.0, 6.0]]]]))
      array([[[ 5., 15.]]])
    """
    check_flag("relu", relu)
    weights = xgrad_cam_weights(activations, gradients, eps=eps)
    xp, (a,) = as_float_arrays(activations=activations)
    maps = _weighted_sum(xp, a, weights)
    return _relu(xp, maps) if relu else maps


@quiet_numpy
def layer_cam(activations: Array, gradients: Array, *, relu: bool = True) -> Array:
    r"""LayerCAM (Jiang et al., IEEE TIP 2021, Eq. 5-6): positive gradients as pixel weights.

    .. math::

        L^c_{\text{LayerCAM}} = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}(G^k) \odot A^k\Big)

    For shallow layers the paper scales the map by :func:`layercam_scale` before fusing
    layers (:func:`fuse_maps`).

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 2.0]], [[3.0, 1.0]]]])
      >>> g = np.array([[[[2.0, -1.0]], [[-1.0, 4.0]]]])
      >>> layer_cam(a, g)  # [1*2 + 0, 0 + 1*4]
      array([[[2., 4.]]])
    """
    check_flag("relu", relu)
    xp, (a, g) = as_float_arrays(activations=activations, gradients=gradients)
    _finite_and_nonempty("layer_cam", activations=a, gradients=g)
    maps = _elementwise_sum(xp, a, _relu(xp, g), "layer_cam")
    return _relu(xp, maps) if relu else maps


@quiet_numpy
def eigen_cam(activations: Array, *, centre: bool = False, sign: str = "fixed", relu: bool = True) -> Array:
    r"""Eigen-CAM (Muhammad & Yeasin, arXiv 2008.00299): the projection on the first principal direction.

    Per example, the activations as a matrix :math:`O` of Z positions by K channels
    (optionally centred: :math:`O - \bar O`, the mean over positions subtracted), its SVD
    :math:`O = U \Sigma V^\top`, and the map

    .. math::

        L_{\text{Eigen-CAM}} = \mathrm{ReLU}(O\, v_1) = \mathrm{ReLU}(\sigma_1 u_1)

    reshaped to the spatial grid. No target: the map is class-agnostic.

    Centring: the paper takes the SVD of :math:`O` itself (``centre=False``, the default);
    pytorch-grad-cam centres first (``centre=True``, a PCA).

    Sign: :math:`v_1` and :math:`-v_1` are equally valid singular vectors and LAPACK picks one
    by its own rules, so without a fix the final ReLU can erase the object (pytorch-grad-cam).
    ``sign="fixed"`` (default) orients the projection p so that its largest magnitude is
    positive (:math:`|\min p| > \max p` flips it, the rule of Seg-Eigen-CAM, Eq. 13); on a
    tie, so that :math:`\sum p \ge 0`; on a further tie, so that its first non-zero value is
    positive (ties judged up to rounding, 1000 eps of the largest magnitude). The map is then
    a function of the activations alone, the same for any SVD routine. ``sign="svd"`` keeps
    the SVD routine's sign; ``sign="numpy"`` the sign ``np.linalg.svd`` gives in the
    activations' own dtype (pytorch-grad-cam's; concrete arrays only).
    float32 NumPy and torch arrays are decomposed in float64 (torch's float32 SVD is off by
    about 1e-5 of the map's range); the result has the input's dtype.

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``; more leading axes (``(N, T, K, *spatial)``)
        are batch axes.
      centre: subtract the mean over positions before the SVD.
      sign: ``"fixed"``, ``"svd"`` or ``"numpy"``, see above.
      relu: apply the final ReLU.

    Returns:
      ``(N, *spatial)`` (or ``(N, T, *spatial)``).

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[3.0, 0.0]], [[4.0, 0.0]]]])  # O = [[3, 4], [0, 0]]: rank one
      >>> eigen_cam(a)  # sigma_1 u_1 = [5, 0]
      array([[[5., 0.]]])
    """
    xp, (a,) = as_float_arrays(activations=activations)
    _finite_and_nonempty("eigen_cam", activations=a)
    check_feature_maps("activations", a)
    return _eigen_map(xp, a, 1, centre, sign, relu)


def eigen_grad_cam(activations: Array, gradients: Array, *, centre: bool = False, sign: str = "fixed",
                   relu: bool = True) -> Array:
    r"""Eigen-Grad-CAM (pytorch-grad-cam's): :func:`eigen_cam` of :math:`G \odot A`.

    .. math::

        L^c = \mathrm{ReLU}\big((G \odot A)_{Z \times K}\, v_1\big)

    Class-specific through :math:`G`. Same ``centre`` and ``sign`` options as :func:`eigen_cam`.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[3.0, 0.0]], [[4.0, 0.0]]]])
      >>> eigen_grad_cam(a, np.full((1, 2, 1, 2), 2.0))  # 2 A: [10, 0]
      array([[[10.,  0.]]])
    """
    xp, (a, g) = as_float_arrays(activations=activations, gradients=gradients)
    _finite_and_nonempty("eigen_grad_cam", activations=a, gradients=g)
    check_feature_maps("activations", a)
    multi = check_gradients_match(a, g)
    product = g * (xp.expand_dims(a, axis=1) if multi else a)
    return _eigen_map(xp, product, 2 if multi else 1, centre, sign, relu)


@quiet_numpy
def fem(activations: Array, *, k: float = 2.0, relu: bool = True) -> Array:
    r"""FEM, the Feature Explanation Method (Fuad et al., IPTA 2020, doi:10.1109/IPTA50016.2020.9286629).

    Per example and channel l, the mean and the (population) standard deviation of
    :math:`A^l` over its Z positions, a binary mask by the k-sigma rule, and the masks summed
    with the means as weights:

    .. math::

        \mu_l = \frac1Z \sum_{ij} A^l_{ij}, \quad
        \sigma_l = \Big(\frac1Z \sum_{ij} (A^l_{ij} - \mu_l)^2\Big)^{1/2}, \quad
        B^l_{ij} = [A^l_{ij} \ge \mu_l + k\, \sigma_l], \quad
        L_{\text{FEM}} = \mathrm{ReLU}\Big(\sum_l \mu_l B^l\Big)

    No gradient and no target: the map is class-agnostic (after a ReLU layer every
    :math:`\mu_l \ge 0` and the final ReLU changes nothing). A constant channel
    (:math:`\sigma_l = 0`) is all ones in :math:`B^l`, whatever the rounding of its mean; the
    statistics are taken on :math:`A^l` scaled by a power of two (exact), so huge and
    subnormal activations neither overflow nor lose the comparison. xplique 2.0.2's ``FEM``
    returns :math:`\sum_l \mu_l B^l` without the ReLU (its convention keeps the sign).

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      k: the number of standard deviations in the threshold (xplique: 2).
      relu: apply the final ReLU.

    Returns:
      ``(N, *spatial)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[0.0, 0.0, 0.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # N=1, K=2, 1x4
      >>> fem(a, k=1.0)  # mu = [1, 1], sigma = [sqrt(3), 0]: B = [[0, 0, 0, 1], [1, 1, 1, 1]]
      array([[[1., 1., 1., 2.]]])
    """
    check_flag("relu", relu)
    xp, (a,) = as_float_arrays(activations=activations)
    _finite_and_nonempty("fem", activations=a)
    check_feature_maps("activations", a)
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or not math.isfinite(k):
        raise ValueError(f"k must be a finite number of standard deviations, got {k!r}")
    shape = shape_of(a)
    flat = xp.reshape(a, shape[:2] + (math.prod(shape[2:]),))  # (N, K, Z)
    top, bottom = xp.max(flat, axis=-1, keepdims=True), xp.min(flat, axis=-1, keepdims=True)
    scale = power_of_two_at_least(xp, xp.maximum(top, -bottom))
    u = flat / scale  # exact: |u| <= 1
    mean = xp.mean(u, axis=-1, keepdims=True)
    std = xp.sqrt(xp.mean((u - mean) ** 2, axis=-1, keepdims=True))
    mask = (u - mean >= k * std) | (top == bottom)  # deviations against k sigma: a tie stays a tie
    signed = xp.sum(xp.astype(mask, a.dtype) * (mean * scale), axis=1)  # (N, Z)
    maps = xp.reshape(signed, (shape[0],) + shape[2:])
    check_finite(maps, "fem", activations=a)
    return _relu(xp, maps) if relu else maps


@quiet_numpy
def smooth_grad_cam_plus_plus(
    activations: Array, noisy_gradients: Array, *, relu: bool = True
) -> Array:
    r"""Smooth Grad-CAM++ (Omeiza et al., arXiv 1908.01224): Grad-CAM++ on averaged derivatives.

    With :math:`g_s = \partial S^c / \partial A` at the noisy input :math:`x + \epsilon_s`,
    :math:`s = 1..n`, and :math:`D^p = \frac1n \sum_s g_s^p` (the exponential-score closed form
    of :func:`gradcam_ref.grad_cam_plus_plus`, whose powers of :math:`g` are the derivatives):

    .. math::

        a^{kc}_{ij} = \frac{D^2_{ij}}{2 D^2_{ij} + \sum_{ab} A^k_{ab}\, D^3_{ij}}, \quad
        w^c_k = \sum_{ij} a^{kc}_{ij}\, \mathrm{ReLU}(D^1_{ij}), \quad
        L^c = \mathrm{ReLU}\Big(\sum_k w^c_k A^k\Big)

    (:math:`a = 0` where the denominator is 0), with :math:`A` the clean input's activations.
    With one sample and no noise it is Grad-CAM++. torchcam 0.5's ``SmoothGradCAMpp`` differs
    (``explain(..., method="smooth-grad-cam++", variant="torchcam")``, see
    :func:`torchcam_smooth_weights`).

    Args:
      activations: :math:`A` of the clean input, ``(N, K, *spatial)``.
      noisy_gradients: :math:`g_s`, ``(n, N, K, *spatial)`` or ``(n, N, T, K, *spatial)``.
      relu: apply the final ReLU.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 1.0]]]])
      >>> g = np.array([[[[[1.0, 0.0]]]], [[[[1.0, 0.0]]]]])  # two identical samples
      >>> smooth_grad_cam_plus_plus(a, g)  # = grad_cam_plus_plus(a, g[0])
      array([[[0.25, 0.25]]])
    """
    check_flag("relu", relu)
    xp, (a, g) = as_float_arrays(activations=activations, noisy_gradients=noisy_gradients)
    check_feature_maps("activations", a)
    check_gradients_match(a, g, "noisy_gradients", samples=True)
    weights = _smooth_weights(xp, a, g)
    check_finite(weights, "smooth_grad_cam_plus_plus", activations=a, noisy_gradients=g)
    maps = _weighted_sum(xp, a, weights)
    return _relu(xp, maps) if relu else maps


@quiet_numpy
def torchcam_smooth_weights(activations: Array, noisy_gradients: Array, *, eps: float = 1e-8) -> Array:
    r"""torchcam 0.5's ``SmoothGradCAMpp`` weights, read from its code (methods/gradient.py).

    .. math::

        a^{kc}_{ij} = \frac{D^2_{ij}}{2 D^2_{ij} + \sum_{ab} A^k_{ab} D^3_{ab} + \epsilon}, \quad
        w^c_k = \sum_{ij} a^{kc}_{ij}\, \mathrm{ReLU}(g_{n,ij})

    Three departures from :func:`smooth_grad_cam_plus_plus`: the sum in the denominator pairs
    :math:`A_{ab}` with :math:`D^3_{ab}` (one number per channel, not :math:`S_k D^3_{ij}`);
    the ReLU is of the *last* sample's gradient :math:`g_n`, not of the average; and torchcam
    weights the *last* noisy forward's activations in the map (its forward hook keeps them).
    Its noise is ``torch.distributions.Normal(0, std).sample(x.shape)`` per sample, drawn from
    torch's global generator: seed torch, draw the same way, and pass the draws as ``noise``.
    The formula is torchcam's, in the inputs' dtype: where its denominator is 0 (eps=0 and zero
    gradients; or in float16, where 1e-8 and the powers of gradients below about 1e-3 underflow)
    it divides 0 by 0, and a ValueError says which.

    Args:
      activations: :math:`A` of the clean input, ``(N, K, *spatial)``.
      noisy_gradients: :math:`g_s`, ``(n, N, K, *spatial)`` or ``(n, N, T, K, *spatial)``.
      eps: torchcam's 1e-8.

    Returns:
      ``(N, K)`` or ``(N, T, K)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 1.0]]]])
      >>> g = np.array([[[[[1.0, 0.0]]]], [[[[1.0, 0.0]]]]])  # D2 = [1, 0], D3 = [1, 0]: sum A D3 = 1
      >>> torchcam_smooth_weights(a, g, eps=0.0)  # 1 / (2 + 1) * 1 + 0
      array([[0.33333333]])
    """
    check_nonnegative("eps", eps)
    xp, (a, g) = as_float_arrays(activations=activations, noisy_gradients=noisy_gradients)
    _finite_and_nonempty("torchcam_smooth_weights", activations=a, noisy_gradients=g)
    check_feature_maps("activations", a)
    check_gradients_match(a, g, "noisy_gradients", samples=True)
    spatial = tuple(range(g.ndim - (a.ndim - 2), g.ndim))
    d2 = xp.mean(g * g, axis=0)
    d3 = xp.mean(g * g * g, axis=0)
    aa = a if d3.ndim == a.ndim else xp.expand_dims(a, axis=1)  # (N, [1,] K, *spatial)
    pair = xp.sum(aa * d3, axis=tuple(i - 1 for i in spatial), keepdims=True)
    denominator = 2 * d2 + pair + eps
    alpha = d2 / denominator
    weights = xp.sum(alpha * _relu(xp, g[-1]), axis=tuple(i - 1 for i in spatial))
    if all_finite(weights) is False and bool(xp.any(denominator == 0)):  # the inputs are finite: 0 / 0
        zeros = int(xp.sum(xp.astype(denominator == 0, xp.int64)))
        if not eps:
            cause = f"eps=0, and noisy_gradients (or their squares, in {g.dtype}) are 0 there: torchcam adds eps=1e-8"
        elif float(xp.asarray(eps, dtype=g.dtype, device=device_of(g))) == 0:
            cause = (f"eps={eps!r} and the powers of noisy_gradients underflow to 0 in {g.dtype}: "
                     "compute in a wider dtype")
        else:
            cause = "sum A D^3 cancels 2 D^2 + eps there"
        raise ValueError(f"torchcam_smooth_weights divides 0 by 0 at {zeros} position(s), where its denominator "
                         f"2 D^2 + sum A D^3 + eps is 0: {cause}")
    check_finite(weights, "torchcam_smooth_weights", activations=a, noisy_gradients=g)
    return weights


def _smooth_weights(xp: Any, a: Array, g: Array) -> Array:
    """:math:`w^c_k` of :func:`smooth_grad_cam_plus_plus`: ``(N, K)`` or ``(N, T, K)``."""
    return plus_plus_weights(xp, a, g, samples=True)


# --- layer fusion ---------------------------------------------------------------------------


@quiet_numpy
def layercam_scale(maps: Array, *, gamma: float = 2.0, spatial_rank: int | None = None) -> Array:
    r"""LayerCAM's scaling of a shallow layer's map (Jiang et al., Eq. 7), per map.

    .. math::

        \hat L = \tanh\Big(\frac{\gamma\, L}{\max L}\Big) \text{ where } \max L > 0, \qquad
        \hat L = 0 \text{ where } \max L \le 0

    LayerCAM's maps are ReLU'd, so :math:`\max L \le 0` means an all-zero map, which stays 0; a
    map with no positive value (a signed one) becomes 0 too, where the ratio would flip its sign.
    torchcam applies :math:`\tanh(\gamma L)` to maps it has already min-max normalised (the same
    when :math:`\min L = 0`).

    Args:
      maps: :math:`L`, ``(N, *spatial)`` (or ``(N, T, *spatial)`` with ``spatial_rank``).
      gamma: :math:`\gamma`, a finite number > 0 (the paper's 2).
      spatial_rank: the number of trailing axes one map spans, in [1, ndim - 1]; default every axis
        but the first.

    Example:
      >>> import numpy as np
      >>> layercam_scale(np.array([[0.0, 1.0, 2.0]]), gamma=2.0).round(4)
      array([[0.    , 0.7616, 0.964 ]])
    """
    check_positive("gamma", gamma)
    xp, (m,) = as_float_arrays(maps=maps)
    _finite_and_nonempty("layercam_scale", maps=m)
    if m.ndim < 2:
        raise ValueError(f"maps must have shape (N, *spatial), got shape {shape_of(m)}")
    rank = check_spatial_rank(spatial_rank, shape_of(m), "maps")
    axes = tuple(range(m.ndim - rank, m.ndim))
    top = xp.max(m, axis=axes, keepdims=True)
    positive = top > 0
    scaled = xp.where(positive, m / xp.where(positive, top, xp.ones_like(top)), xp.zeros_like(m))
    return xp.tanh(gamma * scaled)


@quiet_numpy
def fuse_maps(maps: Sequence[Array], rule: str = "mean", *, size: Sequence[int] | None = None,
              gamma: float = 2.0) -> Array:
    r"""Fuse the maps of several layers into one, after resizing them to ``size``.

    Each map ``(N, *spatial_l)`` is resized (bilinear, half-pixel centres) to ``size`` (default:
    the largest of each axis; for ``"layercam"`` and ``"torchcam"`` after their scaling, as
    torchcam does), then:

    - ``"mean"``: :math:`\frac1L \sum_l L_l` (pytorch-grad-cam normalises the mean again, and
      each layer's map before it: docs/conventions.md has its recipe);
    - ``"max"``: the elementwise maximum :math:`\max_l L_l`;
    - ``"layercam"``: :math:`\max_l \tanh(\gamma L_l / \max L_l)` (:func:`layercam_scale` on
      every map, then the maximum; the paper scales only the shallow layers, so pass those
      through :func:`layercam_scale` yourself and use ``"max"``);
    - ``"torchcam"``: :math:`\max_l \tanh(\gamma L_l)`, torchcam's ``LayerCAM.fuse_cams``, for
      maps post-processed with the torchcam convention (``heatmap(None, "torchcam")``). It is
      ``"layercam"`` where each map's maximum is 1; torchcam's min-max leaves a maximum below 1
      when the map's span is not large next to its epsilon :math:`10^{-8}`.

    Example:
      >>> import numpy as np
      >>> fuse_maps([np.array([[0.0, 1.0]]), np.array([[2.0, 2.0, 0.0, 0.0]])], "max")
      array([[2.  , 2.  , 0.75, 1.  ]])
    """
    check_choice("rule", rule, FUSION_RULES)
    if rule in ("layercam", "torchcam"):
        check_positive("gamma", gamma)
    if not isinstance(maps, (list, tuple)) or not maps:
        raise ValueError(f"maps must be a non-empty list of (N, *spatial) maps, got {type(maps).__name__}")
    named = {f"maps[{i}]": m for i, m in enumerate(maps)}
    xp, arrays = as_float_arrays(**named)
    ranks = {m.ndim for m in arrays}
    if len(ranks) != 1 or len({shape_of(m)[0] for m in arrays}) != 1:
        raise ValueError(f"maps must share their rank and batch size, got shapes {[shape_of(m) for m in arrays]}")
    rank = arrays[0].ndim - 1
    target = (tuple(max(shape_of(m)[1 + i] for m in arrays) for i in range(rank)) if size is None
              else parse_size(size, rank))
    scale = {"layercam": lambda m: layercam_scale(m, gamma=gamma), "torchcam": lambda m: xp.tanh(gamma * m)}
    resized = [resize(xp, scale[rule](m) if rule in scale else m, target, KERNELS[0]) for m in arrays]
    stacked = xp.stack(resized, axis=0)
    return xp.mean(stacked, axis=0) if rule == "mean" else xp.max(stacked, axis=0)


# --- perturbation methods: the pure halves --------------------------------------------------


SCORE_CAM_VARIANTS = ("paper", "pytorch-grad-cam", "torchcam", "official", "tf-keras-vis")


@quiet_numpy
def score_cam_masks(activations: Array, size: Sequence[int], *, variant: str = "paper") -> Array:
    r"""Score-CAM's masks (Wang et al., CVPRW 2020, arXiv 1910.01279, Eq. 5): one per channel.

    .. math::

        M_k = s\big(U(A^k)\big), \qquad s(X) = \frac{X - \min X}{\max X - \min X}

    with :math:`U` the upsampling to the input's ``size``. The variants differ in :math:`U`,
    the order and the epsilon (a channel with :math:`\max = \min` gives a zero mask; with an
    epsilon it gives zeros too):

    - ``"paper"`` and ``"official"`` (the authors' code): bilinear with half-pixel centres,
      then :math:`s` without epsilon;
    - ``"pytorch-grad-cam"``: bilinear with *aligned corners* (``UpsamplingBilinear2d``), then
      :math:`(X - \min)/(\max - \min + 10^{-8})`;
    - ``"torchcam"``: :math:`(X - \min)/(\max - \min + 10^{-8})` at the layer's resolution
      first, then half-pixel bilinear;
    - ``"tf-keras-vis"`` (0.8.7's ``Scorecam``): linear with aligned corners
      (``scipy.ndimage.zoom(order=1)``), then :math:`(X - \min)/(\max - \min + 10^{-7})`
      (``K.epsilon()``).

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      size: the input's spatial shape.
      variant: one of :data:`SCORE_CAM_VARIANTS`.

    Returns:
      Masks in [0, 1], ``(N, K, *size)``.

    Example:
      >>> import numpy as np
      >>> score_cam_masks(np.array([[[0.0, 2.0]]]), (4,))  # upsampled [0, .5, 1.5, 2] / 2
      array([[[0.  , 0.25, 0.75, 1.  ]]])
    """
    check_choice("variant", variant, SCORE_CAM_VARIANTS)
    xp, (a,) = as_float_arrays(activations=activations)
    _finite_and_nonempty("score_cam_masks", activations=a)
    check_feature_maps("activations", a)
    rank = a.ndim - 2
    try:
        size = parse_size(size, rank)
    except ValueError as error:
        raise ValueError(f"{error}, for activations of shape {shape_of(a)} (N, K and {rank} spatial "
                         f"{'axis' if rank == 1 else 'axes'})") from None
    axes = tuple(range(2, a.ndim))
    if variant == "torchcam":
        return resize(xp, _minmax(xp, a, axes, 1e-8), size, "linear-half-pixel")
    eps = {"pytorch-grad-cam": 1e-8, "tf-keras-vis": 1e-7}.get(variant)
    kernel = "linear-half-pixel" if eps is None else "linear-corner"
    return _minmax(xp, resize(xp, a, size, kernel), axes, eps)


@quiet_numpy
def score_cam_weights(mask_scores: Array, *, baseline: Array | None = None) -> Array:
    r"""Score-CAM's weights (Eq. 6-7): a softmax over channels of the score increases.

    .. math::

        w^c_k = \operatorname{softmax}_k\big(y^c(X \odot M_k) - y^c(X_b)\big)

    The baseline score is one number per example, and a softmax does not change when one
    number is subtracted from all its entries: pytorch-grad-cam (no baseline) and torchcam (the
    unmasked input as baseline) get the same weights. So the baseline is checked (finite, one
    per example) but never subtracted: :math:`y^c(X \odot M_k) - y^c(X_b)` would be rounded (or
    overflow) before the softmax's own shift by the largest score. :math:`y^c \le 0` needs no care here.
    The authors' code differs: ``"official"`` weights are the class probabilities
    :math:`\operatorname{softmax}_c(f(X \odot M_k))_c` themselves (pass those as
    ``mask_scores`` and use :func:`gradcam_ref.cam`), and channels whose mask is flat get 0;
    tf-keras-vis 0.8.7 (``"tf-keras-vis"``) weights by the same probabilities, flat channels
    included (their zero mask scores the all-zero input).

    Args:
      mask_scores: :math:`y^c(X \odot M_k)`, ``(N, K)`` or ``(N, T, K)``.
      baseline: :math:`y^c(X_b)`, ``(N,)`` or ``(N, T)``, or None.

    Example:
      >>> import numpy as np
      >>> score_cam_weights(np.array([[0.0, np.log(3.0)]]))
      array([[0.25, 0.75]])
    """
    xp, (s,) = as_float_arrays(mask_scores=mask_scores)
    if baseline is not None:  # its own dtype: it is checked, never computed with
        _, (b,) = as_float_arrays(baseline=baseline)
        same_library(mask_scores=s, baseline=b)
    if s.ndim not in (2, 3):
        raise ValueError(f"mask_scores must have shape (N, K) or (N, T, K), got shape {shape_of(s)}")
    _finite_and_nonempty("score_cam_weights", mask_scores=s)
    if baseline is not None:  # it cancels in the softmax: checked, not subtracted
        try:
            fits = np.broadcast_shapes(shape_of(b), shape_of(s)[:-1]) == shape_of(s)[:-1]
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"baseline must have shape {shape_of(s)[:-1]} (one score per example), "
                             f"got {shape_of(b)}")
        _finite_and_nonempty("score_cam_weights", baseline=b)
    shifted = s - xp.max(s, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    weights = e / xp.sum(e, axis=-1, keepdims=True)
    check_finite(weights, "score_cam_weights", mask_scores=mask_scores)
    return weights


ABLATION_VALUES = ("zero", "pytorch-grad-cam")
ABLATION_DENOMINATORS = ("score", "abs")


def ablated_activations(activations: Array, example: int, channels: Sequence[int], *,
                        value: str = "zero", chunk: int = 32) -> Array:
    r"""The activations of one example with one channel ablated per row: Ablation-CAM's inputs.

    Row r is :math:`A_{\text{example}}` with channel ``channels[r]`` replaced by the ablation
    value ``(len(channels), K, *spatial)``:

    - ``"zero"`` (Desai & Ramaswamy, the paper): 0;
    - ``"pytorch-grad-cam"``: 0 if the example's smallest activation m is 0, else a very
      negative number that grows with the channel's place ``i = channel % chunk`` in its batch
      of ``chunk`` (its AblationLayer re-reads the minimum after each row it edits): the
      float32 sequence :math:`v_0 = m - 10^7`, :math:`v_i = v_{i-1} - 10^7`.

    Args:
      activations: :math:`A`, ``(N, K, *spatial)``.
      example: the example's index, an int in [0, N).
      channels: the channels to ablate, a sequence of ints (one row each; a channel outside
        ``range(K)`` ablates nothing).
      value: ``"zero"`` or ``"pytorch-grad-cam"``, see above.
      chunk: pytorch-grad-cam's batch size, an int >= 1 (read by ``"pytorch-grad-cam"`` only).

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, K=2
      >>> ablated_activations(a, 0, [1])  # channel 1 set to 0
      array([[[[1., 2.]],
      <BLANKLINE>
              [[0., 0.]]]])
    """
    check_choice("value", value, ABLATION_VALUES)
    check_int("chunk", chunk, 1)
    xp, (a,) = as_float_arrays(activations=activations)
    _finite_and_nonempty("ablated_activations", activations=a)
    check_feature_maps("activations", a)
    example = check_int("example", example, 0, shape_of(a)[0], f" (an example of activations {shape_of(a)})")
    try:
        index = np.asarray(list(channels))
    except TypeError:
        index = np.asarray(None)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise TypeError(f"channels must be a sequence of ints (channel indices), got {shown(channels)}")
    index = index.astype(np.int64)
    row = a[example]
    k = shape_of(row)[0]
    device = device_of(a)
    rows = len(index)
    if value == "zero":
        fill = xp.zeros((rows,) + (1,) * row.ndim, dtype=a.dtype, device=device)
    else:
        m = float(to_numpy(xp.min(row)))
        fill_np = np.zeros(rows, dtype=np.float64)
        if m != 0 and rows:
            place = index % chunk
            v = np.float32(m)
            seq = []
            for _ in range(int(place.max()) + 1):  # v_0 .. v_i for the largest place i used
                v = np.float32(v - np.float32(1e7))
                seq.append(float(v))
            fill_np = np.asarray(seq)[place]
        fill = xp.reshape(xp.asarray(fill_np, dtype=a.dtype, device=device_of(a)),
                          (rows,) + (1,) * row.ndim)
    if not (array_api_compat.is_numpy_array(a) or array_api_compat.is_torch_array(a)):  # immutable (JAX, TF)
        onehot = xp.expand_dims(xp.asarray(index, device=device), axis=1) == \
            xp.expand_dims(xp.arange(k, device=device), axis=0)
        onehot = xp.reshape(onehot, (rows, k) + (1,) * (row.ndim - 1))  # (R, K, 1, ...), bool
        return xp.where(onehot, fill, xp.expand_dims(row, axis=0))  # (R, K, *spatial)
    # mutable arrays: R plain copies of the row (a memory copy), then one channel written per copy
    out = xp.asarray(xp.broadcast_to(xp.expand_dims(row, axis=0), (rows, *shape_of(row))), copy=True)
    kept = np.flatnonzero((index >= 0) & (index < k))  # a channel outside range(K) ablates nothing
    values = xp.reshape(fill, (rows,) + (1,) * (row.ndim - 1))
    at = xp.asarray(kept, device=device)
    out[at, xp.asarray(index[kept], device=device)] = values[at, ...]
    return out  # (R, K, *spatial)


@quiet_numpy
def ablation_cam_weights(score: Array, ablated_scores: Array, *, denominator: str = "score") -> Array:
    r"""Ablation-CAM's weights (Desai & Ramaswamy, WACV 2020, Eq. 3): the relative drop of the score.

    .. math::

        w^c_k = \frac{y^c - y^c_k}{y^c}

    with :math:`y^c_k` the score when channel k of the layer is set to zero. When
    :math:`y^c < 0` the paper's formula flips every sign (a channel whose removal lowers the
    score gets a negative weight); when :math:`y^c = 0` it is undefined. ``denominator="score"``
    (the paper) raises for :math:`y^c = 0`; ``"abs"`` divides by :math:`|y^c|`, keeping "a drop
    is evidence for c" for negative scores (and still raises for 0). A difference
    :math:`y^c - y^c_k` past the dtype's largest number (scores near it, of opposite signs) is
    taken on an eighth of both scores (exact), so only a weight beyond it raises.

    Args:
      score: :math:`y^c`, ``(N,)`` or ``(N, T)``.
      ablated_scores: :math:`y^c_k`, ``(N, K)`` or ``(N, T, K)``.
      denominator: ``"score"`` or ``"abs"``.

    Example:
      >>> import numpy as np
      >>> ablation_cam_weights(np.array([2.0]), np.array([[1.0, 3.0]]))
      array([[ 0.5, -0.5]])
    """
    check_choice("denominator", denominator, ABLATION_DENOMINATORS)
    xp, (y, yk) = as_float_arrays(score=score, ablated_scores=ablated_scores)
    if shape_of(yk)[:-1] != shape_of(y):
        raise ValueError(f"ablated_scores must have shape score.shape + (K,) = {shape_of(y)} + (K,), "
                         f"got {shape_of(yk)}")
    zero = xp.asarray(y == 0)
    if bool(xp.any(zero)):
        raise ValueError(
            "Ablation-CAM divides by the target score y^c, which is exactly 0 for "
            f"{int(xp.sum(xp.astype(zero, xp.int64)))} example(s): the weights are undefined there"
        )
    d = xp.abs(y) if denominator == "abs" else y
    y, d = xp.expand_dims(y, axis=-1), xp.expand_dims(d, axis=-1)
    # y - y_k may pass the largest number (by at most a factor 2) where the ratio fits: those
    # weights are formed on an eighth of both (exact), the others as they are
    eighth = _eighth_where_huge(xp, xp.abs(y - yk), yk)
    weights = (y * eighth - yk * eighth) / (d * eighth)
    check_finite(weights, "ablation_cam_weights", score=score, ablated_scores=ablated_scores)
    return weights


# --- dispatch: method name -> (weights, signed map) -------------------------------------------


class MethodFields(NamedTuple):
    """What a method computes: its weights (None where the method has none) and its signed map."""

    weights: Array | None
    signed: Array


@quiet_numpy
def given_weights_fields(xp: Any, activations: Array, weights: Array) -> MethodFields:
    r"""The weights and the signed map :math:`\sum_k w^c_k A^k` of weights computed apart from :math:`A`,
    both in the activations' dtype.

    Score-CAM's and Ablation-CAM's weights come from the model's scores, whose dtype may be wider than the
    layer's: a Keras model under ``mixed_float16`` with its float32 head (as Keras recommends), a half-precision
    torch model ending in ``.float()``. They follow the rule of the gradient methods, whose weights come from
    :math:`G`, in :math:`A`'s dtype: half precision is computed in float32 and cast back to the activations'
    dtype. So the weights are cast to the activations' dtype (Smooth Grad-CAM++'s are in it already), and the
    map is formed from those weights; where the dtype is half precision (float16, bfloat16), as the weighted
    sum of :func:`gradcam_ref._arrays.widen_half`'s float32 arrays, cast back once (a partial sum may pass
    float16's 65504 where the map does not). A weight or a map past the dtype's largest number raises. Without
    the cast, array promotion made these maps float32 where every other method's are float16.
    Activations and weights of one dtype of 32 bits or more are computed as :func:`gradcam_ref.cam` computes
    them, bit for bit, the weights returned as given; weights wider than float32 activations (float64 scores)
    are cast to float32 too.

    Args:
      xp: the arrays' namespace (:func:`gradcam_ref._arrays.as_float_arrays`'s, which makes NumPy float64).
      activations: :math:`A`, ``(N, K, *spatial)``.
      weights: :math:`w^c`, ``(N, K)`` or ``(N, T, K)``, an array of ``xp`` of any floating dtype.

    Returns:
      ``(weights, signed)`` in the activations' dtype: ``(N, K)`` or ``(N, T, K)``, and the map before the
      ReLU, ``(N, *spatial)`` or ``(N, T, *spatial)``.

    Example:
      >>> import numpy as np
      >>> a = np.array([[[[60000.0]], [[60000.0]], [[-60000.0]]]], np.float16)  # N=1, K=3, 1x1
      >>> w, signed = given_weights_fields(np, a, np.array([[1.0, 0.5, 1.0]], np.float32))
      >>> w.dtype, signed.dtype, float(signed[0, 0, 0])  # 60000 + 30000 - 60000: 90000 is past float16's range
      (dtype('float16'), dtype('float16'), 30000.0)
    """
    a, w = activations, weights
    check_feature_maps("activations", a)
    n, k = shape_of(a)[:2]
    if w.ndim not in (2, 3) or shape_of(w)[0] != n or shape_of(w)[-1] != k or 0 in shape_of(w):
        raise ValueError(f"weights must have shape (N, K) = ({n}, {k}) or (N, T, K) = ({n}, T, {k}) to match "
                         f"activations {shape_of(a)}, got shape {shape_of(w)}")
    dtype = a.dtype
    if w.dtype != dtype:
        w = xp.astype(w, dtype)
        check_finite(w, "the weights cast to the activations' dtype", weights=weights)
    if xp.finfo(dtype).bits >= 32:
        signed = _weighted_sum(xp, a, w)
    else:
        wide_a, wide_w = widen_half(xp, a, w)
        signed = xp.astype(_weighted_sum(xp, wide_a, wide_w), dtype)
    check_finite(signed, "cam", activations=a, class_weights=w)
    return MethodFields(w, signed)


def method_fields(method: str, activations: Array, gradients: Array | None, *,
                  target_scores: Array | None = None, **options: Any) -> MethodFields:
    """The weights and the map before the final ReLU of a gradient method, from ``(A, G)``.

    ``options`` are the method function's keyword arguments (``eps`` and ``variant`` for
    Grad-CAM++, ``eps`` for XGrad-CAM, ``centre`` and ``sign`` for the Eigen methods, ``k`` for
    FEM). ``target_scores`` (:math:`y^c`, ``(N,)`` or ``(N, T)``) are read by Grad-CAM++'s
    ``variant="tf-keras-vis"`` only. Perturbation methods and Smooth Grad-CAM++ need more than
    one capture: :func:`gradcam_ref.explain` computes them.
    """
    check_method(method)
    a, g = activations, gradients
    allowed = _OPTIONS.get(method, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes the options {list(allowed)}, got {unknown}")
    if method == "grad-cam":
        weights, signed = grad_cam_parts(a, g)
        return MethodFields(weights, signed)
    if method == "grad-cam++":
        xp, (aa, gg) = as_float_arrays(activations=a, gradients=g)
        check_feature_maps("activations", aa)
        check_gradients_match(aa, gg)
        variant = options.get("variant", "paper")
        weights = _plus_plus_variant_weights(xp, aa, gg, options.get("eps", 0.0), variant,
                                             target_scores if variant == "tf-keras-vis" else None)
        return MethodFields(weights, _weighted_sum(xp, aa, weights))
    if method == "xgrad-cam":
        weights = xgrad_cam_weights(a, g, **options)
        xp, (aa,) = as_float_arrays(activations=a)
        return MethodFields(weights, _weighted_sum(xp, aa, weights))
    if method == "hirescam":
        return MethodFields(None, hires_cam(a, g, relu=False))
    if method == "layercam":
        return MethodFields(None, layer_cam(a, g, relu=False))
    if method == "eigen-cam":
        return MethodFields(None, _per_target(eigen_cam(a, relu=False, **options), g, a))
    if method == "eigen-grad-cam":
        return MethodFields(None, eigen_grad_cam(a, g, relu=False, **options))
    if method == "fem":
        return MethodFields(None, _per_target(fem(a, relu=False, **options), g, a))
    raise ValueError(f"method {method!r} is computed by gradcam_ref.explain, not from one capture")


_OPTIONS: dict[str, tuple[str, ...]] = {
    "grad-cam++": ("eps", "variant"),
    "xgrad-cam": ("eps",),
    "eigen-cam": ("centre", "sign"),
    "eigen-grad-cam": ("centre", "sign"),
    "fem": ("k",),
}


def _per_target(signed: Array, g: Array | None, a: Array) -> Array:
    """A class-agnostic map ``(N, *spatial)`` repeated for each of T targets when ``g`` has them."""
    if g is None or g.ndim != a.ndim + 1:
        return signed
    xp = namespace(signed)
    return xp.broadcast_to(xp.expand_dims(signed, axis=1), (shape_of(g)[0], shape_of(g)[1], *shape_of(signed)[1:]))


# --- helpers ---


def _finite_and_nonempty(what: str, **arrays: Array) -> None:
    """Refuse empty or non-finite inputs by name: a ReLU or an SVD would hide or choke on them."""
    for name, x in arrays.items():
        if 0 in shape_of(x):
            raise ValueError(f"{name} must not be empty, got shape {shape_of(x)}")
    if all_finite(*arrays.values()) is False:
        for name, x in arrays.items():
            check_finite(x, what, **{name: x})


def _flat(xp: Any, x: Array, lead: int) -> Array:
    """``x`` with every axis after the first ``lead`` ones merged into one."""
    shape = shape_of(x)
    return xp.reshape(x, shape[:lead] + (math.prod(shape[lead:]),))


def _spatial_sum(xp: Any, x: Array, lead: int) -> Array:
    return xp.sum(_flat(xp, x, lead), axis=-1)


def _elementwise_sum(xp: Any, a: Array, g: Array, what: str) -> Array:
    """``sum_k g[..., k, :] * a[:, k, :]``: ``(N, *spatial)`` or ``(N, T, *spatial)``."""
    check_feature_maps("activations", a)
    multi = check_gradients_match(a, g)
    maps = xp.sum(g * (xp.expand_dims(a, axis=1) if multi else a), axis=2 if multi else 1)
    check_finite(maps, what, activations=a, gradients=g)
    return maps


def _minmax(xp: Any, x: Array, axes: tuple[int, ...], eps: float | None) -> Array:
    low = xp.min(x, axis=axes, keepdims=True)
    span = xp.max(x, axis=axes, keepdims=True) - low
    if eps is not None:
        return (x - low) / (span + eps)
    positive = span > 0
    return xp.where(positive, (x - low) / xp.where(positive, span, xp.ones_like(span)), xp.zeros_like(x))


SIGNS = ("fixed", "svd", "numpy")


def _eigen_map(xp: Any, x: Array, n_lead: int, centre: bool, sign: str, relu: bool) -> Array:
    """Per leading index (``n_lead`` axes before K): the projection of the (Z, K) matrix on v_1."""
    check_choice("sign", sign, SIGNS)
    check_flag("centre", centre)
    check_flag("relu", relu)
    shape = shape_of(x)
    lead_shape, k, spatial = shape[:n_lead], shape[n_lead], shape[n_lead + 1:]
    o = xp.reshape(x, lead_shape + (k, math.prod(spatial)))
    o = xp.matrix_transpose(o)  # (..., Z, K)
    dtype = o.dtype
    # torch's float32 SVD is off by ~1e-5 of the map, and it has none in float16 or bfloat16: do
    # it in float64 (JAX: float32, its widest without jax_enable_x64; its own float32 is left as is).
    wide = xp.float32 if array_api_compat.is_jax_array(o) else xp.float64
    if xp.finfo(dtype).bits < xp.finfo(wide).bits:
        o = xp.astype(o, wide)
    if centre:
        o = o - xp.mean(o, axis=-2, keepdims=True)
    _, _, vh = xp.linalg.svd(o, full_matrices=False)
    p = xp.squeeze(xp.matmul(o, xp.expand_dims(vh[..., 0, :], axis=-1)), axis=-1)  # (..., Z)
    if sign == "fixed":  # judged in the SVD's dtype, whose rounding it must see through
        p = p * _orientation(xp, p)
    elif sign == "numpy":
        p = p * _numpy_orientation(xp, x, n_lead, centre, p)
    maps = xp.reshape(xp.astype(p, dtype), lead_shape + spatial)
    check_finite(maps, "eigen_cam", activations=x)
    return _relu(xp, maps) if relu else maps


def _numpy_orientation(xp: Any, x: Array, n_lead: int, centre: bool, p: Array) -> Array:
    """+1 or -1 per row: the sign that makes ``p`` agree with NumPy's full SVD in ``x``'s dtype."""
    host = to_numpy(x)
    shape = host.shape
    o = np.swapaxes(host.reshape(shape[:n_lead] + (shape[n_lead], -1)), -1, -2)
    if centre:
        o = o - o.mean(axis=-2, keepdims=True)
    flat = o.reshape((-1,) + o.shape[-2:])
    reference = np.stack([m @ np.linalg.svd(m, full_matrices=True)[2][0] for m in flat])
    agree = np.sum(reference.astype(np.float64) * to_numpy(p).reshape(reference.shape), axis=-1) >= 0
    signs = np.where(agree, 1.0, -1.0).reshape(shape[:n_lead] + (1,))
    return xp.asarray(signs, dtype=p.dtype, device=device_of(p))


def _orientation(xp: Any, p: Array) -> Array:
    """+1 or -1 per row of ``p`` ``(..., Z)``: largest magnitude positive, then sum, then first non-zero.

    Ties are judged up to rounding: values closer than ``1000 eps`` times the row's largest
    magnitude (at least the smallest normal number: below it rounding is absolute) count as
    equal (as zero for the sum and the first non-zero value), so that the SVD's last bits cannot
    choose the sign.
    """
    top, bottom = xp.max(p, axis=-1), xp.min(p, axis=-1)
    info = xp.finfo(p.dtype)
    scale = xp.maximum(xp.maximum(top, -bottom), info.smallest_normal)  # subnormals round absolutely
    tol = 1000 * info.eps * scale
    total = xp.sum(p, axis=-1)
    significant = xp.abs(p) > xp.expand_dims(tol, axis=-1)
    first_index = xp.argmax(xp.astype(significant, xp.int32), axis=-1)
    first = xp.squeeze(xp.take_along_axis(p, xp.expand_dims(first_index, axis=-1), axis=-1), axis=-1)
    total_tol = tol * shape_of(p)[-1]
    sign = xp.where(-bottom > top + tol, -1.0, xp.where(-bottom < top - tol, 1.0,
                    xp.where(total < -total_tol, -1.0, xp.where(total > total_tol, 1.0,
                             xp.where(first < 0, -1.0, 1.0)))))
    return xp.expand_dims(xp.astype(sign, p.dtype), axis=-1)
