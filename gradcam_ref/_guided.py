r"""Guided Grad-CAM (Fig. 1 of Selvaraju et al.): the coarse map times guided backpropagation.

Guided backpropagation (Springenberg et al.) is the gradient of the score :math:`y^c` with
respect to the input image :math:`x`, computed with a modified backward rule at every ReLU: the
gradient :math:`g` arriving at a ReLU with input :math:`z` leaves it as

.. math::

    \frac{\partial^{\text{guided}} y^c}{\partial z} = g \cdot [z > 0] \cdot [g > 0]

(the ordinary rule is :math:`g \cdot [z > 0]`). It is sharp but not class-discriminative; the
Grad-CAM map :math:`L^c` is class-discriminative but coarse. Their product, with :math:`L^c`
upsampled to the image, is Guided Grad-CAM. The backends compute the guided gradients (the
framework-specific part); this module does the arithmetic on arrays of any library.

References:
  Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR 2015
  workshop, https://arxiv.org/abs/1412.6806
  Selvaraju et al., "Grad-CAM", Sec. 3.1 "Guided Grad-CAM", https://arxiv.org/abs/1610.02391
"""

from __future__ import annotations

from gradcam_ref._arrays import (
    Array,
    as_float_arrays,
    check_finite,
    check_positive,
    power_of_two_at_least,
    quiet_numpy,
    shape_of,
    widen_half,
)
from gradcam_ref._postprocess import upsample

DISPLAY_SCALE = 0.1
"""Standard deviations to display units in :func:`guided_image`: ``0.5 +- 5 std`` spans [0, 1]."""


@quiet_numpy
def guided_grad_cam(guided_backprop: Array, maps: Array, *, spatial_rank: int = 2) -> Array:
    r"""Guided Grad-CAM: guided backpropagation times the Grad-CAM map upsampled to the input.

    .. math::

        \text{GGC}^c_{n,ch,p} = G^c_{n,ch,p} \cdot \mathrm{up}(L^c_n)_p

    for every input channel ``ch`` and input position ``p``, with :math:`G^c` =
    ``guided_backprop`` (:math:`\partial^{\text{guided}} y^c / \partial x`), :math:`L^c` =
    ``maps`` and :math:`\mathrm{up}` = :func:`gradcam_ref.upsample` to the input's spatial shape
    (half-pixel linear interpolation, the numbers of torch ``F.interpolate(align_corners=False)``).

    Args:
      guided_backprop: :math:`G^c`, shape ``(N, C, *S)`` for one target per example, or
        ``(N, T, C, *S)`` for T targets per example (C input channels, S the input's spatial
        shape).
      maps: :math:`L^c`, shape ``(N, *s)`` or ``(N, T, *s)`` (the output of
        :func:`gradcam_ref.grad_cam`), with as many spatial axes as the input.
      spatial_rank: the number of spatial axes (2 for images). It tells ``(N, C, D, H, W)``
        volumes from ``(N, T, C, H, W)`` image targets, which the shapes alone cannot.

    Returns:
      Guided Grad-CAM, the shape of ``guided_backprop``.

    Example:
      >>> import numpy as np
      >>> g = np.array([[[[1.0, -2.0, 3.0, 4.0]]]])  # N=1, C=1, 1x4 input
      >>> maps = np.array([[[0.0, 1.0]]])  # N=1, 1x2 map: upsampled [0, .25, .75, 1]
      >>> guided_grad_cam(g, maps)
      array([[[[ 0.  , -0.5 ,  2.25,  4.  ]]]])
    """
    xp, (g, m) = as_float_arrays(guided_backprop=guided_backprop, maps=maps)
    if isinstance(spatial_rank, bool) or not isinstance(spatial_rank, int) or spatial_rank < 1:
        raise ValueError(f"spatial_rank must be a positive int, got {spatial_rank!r}")
    gs, ms = shape_of(g), shape_of(m)
    lead = len(ms) - spatial_rank  # 1: (N,), 2: (N, T)
    if lead not in (1, 2) or len(gs) != len(ms) + 1 or gs[:lead] != ms[:lead] or 0 in gs or 0 in ms:
        raise ValueError(
            f"guided_backprop must be (N, C, *S) with maps (N, *s), or (N, T, C, *S) with maps "
            f"(N, T, *s), with {spatial_rank} spatial axes (spatial_rank) and no empty axis; "
            f"got guided_backprop {gs} and maps {ms}"
        )
    up = upsample(m, gs[len(gs) - spatial_rank:])  # (N, [T,] *S)
    result = g * xp.expand_dims(up, axis=lead)  # broadcast over the input channels
    check_finite(result, "guided_grad_cam", guided_backprop=g, maps=m)
    return result


@quiet_numpy
def guided_image(guided: Array, *, scale: float = DISPLAY_SCALE) -> Array:
    r"""A guided backpropagation or Guided Grad-CAM image, made displayable: ``[0, 1]``, channels last.

    Each image (the last three axes ``(C, H, W)`` of ``guided``) is standardised and mapped
    around mid-grey:

    .. math::

        \text{out} = \mathrm{clip}\Big(\tfrac12 + s \cdot \frac{x - \mu}{\sigma},\ 0,\ 1\Big)

    with :math:`\mu` and :math:`\sigma` the mean and (population) standard deviation of the
    image's ``C * H * W`` values and :math:`s` = ``scale`` (0.1: values within 5 standard
    deviations of the mean are not clipped). Zero gradient is not mid-grey unless
    :math:`\mu = 0`; the sign of a channel shows as a colour. This is the normalisation of the
    Grad-CAM authors' Keras code and of pytorch-grad-cam's ``deprocess_image`` (which adds
    1e-5 to :math:`\sigma` and returns ``uint8``, ``255 * out`` truncated); here a flat image
    (:math:`\sigma = 0`, every value equal) becomes uniform 0.5.

    The output does not change when ``guided`` is scaled, and neither does its computation: the
    image is divided by a power of two at least its largest magnitude and the deviations
    :math:`x - \mu` by one at least theirs (exact), so that their squares neither overflow (float64
    gradients past 1e154) nor underflow (float64 below 1e-162, float32 below 4e-23). float16
    and bfloat16 images are computed in float32 (their squared deviations underflow below
    2e-4) and the result cast back.

    Args:
      guided: ``(..., C, H, W)``, e.g. an Explanation's ``guided_backprop`` or
        ``guided_grad_cam`` (``(N, C, H, W)`` or ``(N, T, C, H, W)``); finite.
      scale: :math:`s`, positive.

    Returns:
      ``(..., H, W, C)`` in ``[0, 1]``, the array's library and float dtype (``imshow`` takes
      ``out[n]`` for C = 3; use ``out[n, ..., 0]`` for one channel).

    Example:
      >>> import numpy as np
      >>> g = np.array([[[[-1.0, 1.0]], [[3.0, -3.0]]]])  # N=1, C=2, 1x2: mean 0, std sqrt(5)
      >>> out = guided_image(g, scale=0.1 * 5 ** 0.5)  # s / std = 0.1: out = 0.5 + 0.1 g
      >>> out.shape  # (N, H, W, C)
      (1, 1, 2, 2)
      >>> np.round(out[0, 0], 3)  # [pixel 0: (C0, C1), pixel 1: (C0, C1)]
      array([[0.4, 0.8],
             [0.6, 0.2]])
    """
    xp, (x,) = as_float_arrays(guided=guided)
    if x.ndim < 3 or 0 in shape_of(x):
        raise ValueError(f"guided must have shape (..., C, H, W) with no empty axis, got {shape_of(x)}")
    check_positive("scale", scale)  # inf: a flat image would be inf * 0 = NaN
    axes = (-3, -2, -1)
    dtype = x.dtype
    (w,) = widen_half(xp, x)
    top, bottom = xp.max(w, axis=axes, keepdims=True), xp.min(w, axis=axes, keepdims=True)
    u = w / power_of_two_at_least(xp, xp.maximum(top, -bottom))  # |u| < 4: the mean cannot overflow
    d = u - xp.mean(u, axis=axes, keepdims=True)
    d = d / power_of_two_at_least(xp, xp.max(xp.abs(d), axis=axes, keepdims=True))  # the largest |d| in [1/2, 1]
    std = xp.sqrt(xp.mean(d * d, axis=axes, keepdims=True))
    check_finite(std, "guided_image", guided=x)
    spread = (std > 0) & (top > bottom)  # a flat image's mean may round off its value: d is then not 0
    z = xp.where(spread, d / xp.where(spread, std, xp.ones_like(std)), xp.zeros_like(d))
    out = xp.clip(0.5 + scale * z, 0.0, 1.0)
    return _channels_last(xp, out if out.dtype == dtype else xp.astype(out, dtype))


def _channels_last(xp, x: Array) -> Array:
    """``(..., C, H, W)`` -> ``(..., H, W, C)``."""
    order = (*range(x.ndim - 3), x.ndim - 2, x.ndim - 1, x.ndim - 3)
    return xp.permute_dims(x, order)

