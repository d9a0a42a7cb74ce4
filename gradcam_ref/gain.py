r"""GAIN (Li et al., "Tell Me Where to Look", CVPR 2018): Grad-CAM as a training signal.

The map :math:`A^c` of ``explain(..., differentiable="stop" | "full")`` is normalised per
example (:func:`normalize_maps`), turned into a soft mask (:func:`soft_mask`, Eq. 4) that
erases what the network attends to (:func:`masked_image`, Eq. 3); the network is then trained
so that the erased image no longer shows the class (:func:`attention_mining_loss`, Eq. 5;
:func:`self_guided_loss`, Eq. 6) and, where pixel labels exist, so that the map matches them
(:func:`external_supervision_loss`, Eq. 7; :func:`gain_ext_loss`, Eq. 8).

Array code only (array API): the same functions under NumPy (float64, the reference), torch
(autograd) and JAX (``jax.grad``, ``jax.jit``). Range checks of values run whenever values can be
read (not on JAX tracers). The derivation, the choice of constants and the measured experiment:
docs/gain.md.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Any

import array_api_compat
import numpy as np

from gradcam_ref._arrays import (
    Array,
    all_finite,
    as_float_arrays,
    check_finite,
    check_spatial_rank,
    is_array,
    quiet_numpy,
    same_library,
    shape_of,
    to_numpy,
)
from gradcam_ref._postprocess import _eighth_where_huge, upsample

__all__ = [
    "attention_mining_loss",
    "external_supervision_loss",
    "gain_ext_loss",
    "masked_image",
    "normalize_maps",
    "self_guided_loss",
    "sigmoid",
    "soft_mask",
    "stop_gradient",
]

SIGMA = 0.5
"""Default threshold :math:`\\sigma` of Eq. 4: the middle of a min-max normalised map."""
OMEGA = 10.0
"""Default mask sharpness :math:`\\omega` of Eq. 4 (not the weight of :math:`L_e`: ``w_e``)."""
ALPHA = 1.0
"""Default weight :math:`\\alpha` of :math:`L_{am}` (Eq. 6, 8), the paper's."""
W_E = 10.0
"""Default weight :math:`w_e` of :math:`L_e` (Eq. 8), the paper's :math:`\\omega = 10`."""


def stop_gradient(x: Array) -> Array:
    """``x`` as a constant for autograd: ``x.detach()`` (torch), ``jax.lax.stop_gradient`` (JAX), ``x`` (NumPy)."""
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        return importlib.import_module("jax").lax.stop_gradient(x)  # jax is imported: x is a JAX array
    return x


@quiet_numpy
def normalize_maps(maps: Array, *, spatial_rank: int | None = None) -> Array:
    r"""Per-example min-max normalisation into [0, 1], the minimum and maximum held constant.

    .. math::

        \hat A^c = \frac{A^c - \mathrm{sg}(\min A^c)}{\mathrm{sg}(\max A^c - \min A^c)}

    where :math:`\mathrm{sg}` stops the gradient (:func:`stop_gradient`): the derivative is
    :math:`1/\mathrm{span}` at every pixel, as in every public GAIN implementation; letting it
    flow through the arg-min and arg-max pixels would route the whole loss through two pixels.
    A flat map (span 0, e.g. all zeros after the ReLU) becomes zeros with zero gradient, never NaN.
    A span past the dtype's largest number (a signed float16 map over +-32752) is taken on an
    eighth of the values, as in :func:`gradcam_ref.normalize`: the same numbers.

    Args:
      maps: Grad-CAM maps ``(N, *spatial)`` (or ``(N, T, *spatial)`` with ``spatial_rank``).
      spatial_rank: the number of trailing axes one map spans; default every axis but the first.

    Returns:
      The normalised maps, same shape and library.
    """
    xp, (x,) = as_float_arrays(maps=maps)
    if x.ndim < 2 or 0 in shape_of(x):
        raise ValueError(f"maps must have shape (N, *spatial) and no empty axis, got {shape_of(x)}")
    rank = check_spatial_rank(spatial_rank, shape_of(x), "maps")
    axes = tuple(range(x.ndim - rank, x.ndim))
    constant = stop_gradient(x)
    low = xp.min(constant, axis=axes, keepdims=True)
    high = xp.max(constant, axis=axes, keepdims=True)
    if all_finite(low * 0 + high * 0) is False:  # NaN iff NaN or Inf in maps (inf * 0); a span may overflow
        raise ValueError("maps contains NaN or Inf; normalize_maps needs finite maps")
    eighth = _eighth_where_huge(xp, high - low, low)  # a span past the largest number: an eighth of it (exact)
    span = high * eighth - low * eighth
    positive = span > 0
    safe = xp.where(positive, span, xp.ones_like(span))
    return xp.where(positive, (x * eighth - low * eighth) / safe, xp.zeros_like(x))


def sigmoid(logits: Array) -> Array:
    r""":math:`1 / (1 + e^{-z})`, to full relative precision, with a finite derivative everywhere.

    The probability-like score :math:`s^c` that :func:`attention_mining_loss` needs, from the
    logits of a binary or multi-label head. Evaluated as :math:`1 / (1 + e^{-z})` for
    :math:`z \ge 0` and :math:`e^{z} / (1 + e^{z})` for :math:`z < 0`, each branch fed only its
    own half of the inputs, so no exponential overflows and autograd sees no ``inf * 0``.
    :math:`\pm\infty` give 1 and 0; a NaN logit is refused (when values can be read).
    """
    xp, (z,) = as_float_arrays(logits=logits)
    positive = z >= 0
    zero = xp.zeros_like(z)
    e_neg = xp.exp(-xp.where(positive, z, zero))  # exp(-z) for z >= 0, in (0, 1]
    e_pos = xp.exp(xp.where(positive, zero, z))  # exp(z) for z < 0, in (0, 1)
    out = xp.where(positive, 1.0 / (1.0 + e_neg), e_pos / (1.0 + e_pos))
    if all_finite(out) is False:  # only NaN logits give NaN (NaN >= 0 is False: e_pos is NaN)
        nan = int(np.isnan(to_numpy(stop_gradient(z))).sum())
        raise ValueError(f"logits contains NaN ({nan} of {math.prod(shape_of(z))} values); sigmoid needs "
                         "numbers (+-inf give 1 and 0)")
    return out


def _check_parameters(sigma: float, omega: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0.0 < float(sigma) < 1.0:
        raise ValueError(
            f"sigma (the mask threshold of Eq. 4, on maps normalised into [0, 1]) must be in (0, 1), got {sigma!r}"
        )
    if isinstance(omega, bool) or not isinstance(omega, numbers.Real) or not 0.0 < float(omega) < math.inf:
        raise ValueError(f"omega (the mask sharpness of Eq. 4) must be a finite number > 0, got {omega!r}")


def _check_unit_range(name: str, x: Array, hint: str) -> None:
    """Refuse values outside [0, 1] (or NaN) when they can be read (skipped for JAX tracers)."""
    if all_finite(x) is None:
        return
    values = to_numpy(stop_gradient(x))
    if values.size and not (values.min() >= 0.0 and values.max() <= 1.0):  # NaN fails both
        raise ValueError(f"{name} must lie in [0, 1]{hint}, got values in [{values.min():.6g}, {values.max():.6g}]")


def soft_mask(maps: Array, *, sigma: float = SIGMA, omega: float = OMEGA) -> Array:
    r"""The soft mask of Eq. 4: :math:`T(A^c) = \mathrm{sigmoid}(\omega (A^c - \sigma))`.

    A differentiable threshold of the normalised map at :math:`\sigma`. The paper gives neither
    constant (implementations use 0.5/10, 0.5/8, 0.25/100, 0.4/100). Defaults
    :math:`\sigma = 0.5`, :math:`\omega = 10`: on a map in [0, 1] the mask runs from
    :math:`T(0) = 0.0067` to :math:`T(1) = 0.9933`, nearly binary at the ends, while its slope
    :math:`\omega T (1 - T)` stays above 0.066 everywhere, so every pixel of the map receives
    gradient. With :math:`\omega = 100` the slope is below :math:`10^{-19}` outside
    :math:`|A - \sigma| < 0.4`: a hard threshold that trains almost nothing.

    Computed by :func:`sigmoid` (full precision, finite derivative for every input).

    Args:
      maps: normalised maps in [0, 1] (:func:`normalize_maps`), any shape.
      sigma: the threshold :math:`\sigma`, in (0, 1).
      omega: the sharpness :math:`\omega > 0` (called :math:`\omega` in Eq. 4; the weight of
        :math:`L_e` in Eq. 8 is a different number, ``w_e`` here).

    Returns:
      :math:`T`, same shape and library, in (0, 1).
    """
    _check_parameters(sigma, omega)
    xp, (x,) = as_float_arrays(maps=maps)
    _check_unit_range("maps", x, " (normalise them first: gradcam_ref.gain.normalize_maps)")
    return sigmoid(float(omega) * (x - float(sigma)))


def masked_image(images: Array, maps: Array, *, sigma: float = SIGMA, omega: float = OMEGA) -> Array:
    r"""The image with its attended region erased, Eq. 3: :math:`I^{*c} = I - T(A^c) \odot I`.

    The normalised map is first upsampled to the image (the project's half-pixel bilinear
    :func:`gradcam_ref.upsample`, differentiable), then thresholded by :func:`soft_mask`, then
    broadcast over the image's channels.

    Args:
      images: :math:`I`, ``(N, C, *S)`` (channels first).
      maps: normalised maps :math:`A^c` in [0, 1], ``(N, *s)`` at any resolution of the same rank.
      sigma: the threshold of :func:`soft_mask`.
      omega: the sharpness of :func:`soft_mask`.

    Returns:
      :math:`I^*`, the shape of ``images``.
    """
    _check_parameters(sigma, omega)
    xp, (i, a) = as_float_arrays(images=images, maps=maps)
    si, sa = shape_of(i), shape_of(a)
    if len(si) < 3 or 0 in si:
        raise ValueError(f"images must have shape (N, C, *S) with no empty axis, got {si}")
    if len(sa) != len(si) - 1 or sa[0] != si[0] or 0 in sa:
        raise ValueError(
            f"maps must have shape (N, *s) for images (N, C, *S) = {si}: one map per image, "
            f"as many spatial axes, no empty one, got maps of shape {sa}"
        )
    mask = soft_mask(upsample(a, si[2:]), sigma=sigma, omega=omega)
    erased = i - mask[:, None, ...] * i
    check_finite(erased, "masked_image", images=i)  # the mask is in (0, 1): only NaN or Inf pixels spread
    return erased


def attention_mining_loss(scores: Array, labels: Array) -> Array:
    r"""Eq. 5: :math:`L_{am} = \frac1n \sum_{c} s^c(I^{*c})`, the mean over the batch.

    :math:`s^c(I^{*c})` is the score of ground-truth class :math:`c` on the image erased by its
    own map (:func:`masked_image`), and :math:`n` the number of ground-truth classes of the
    example. The scores must be probability-like, in [0, 1] (the sigmoid of the logits for a
    binary or multi-label head): a raw logit has no lower bound, so minimising it would drive it
    to :math:`-\infty` instead of to "no evidence left".

    Args:
      scores: :math:`s(I^*)` ``(N, C)`` in [0, 1]; for each example only its ground-truth
        columns are read (for T erased images per example, pass column c of the c-th one).
      labels: multi-hot ``(N, C)`` in {0, 1} (at least one 1 per row), or class indices ``(N,)``.

    Returns:
      A scalar.
    """
    xp, (s,) = as_float_arrays(scores=scores)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (N, C), got {shape_of(s)}")
    _check_unit_range("scores", s, " (probability-like: pass the sigmoid of the logits, not the logits)")
    y = _multi_hot(xp, labels, shape_of(s), s)
    per_example = xp.sum(y * s, axis=1) / xp.sum(y, axis=1)
    return xp.mean(per_example)


def _multi_hot(xp: Any, labels: Array, shape: tuple[int, ...], like: Array) -> Array:
    n, c = shape
    if is_array(labels):
        same_library(scores=like, labels=labels)
        ls = shape_of(labels)
    else:
        labels = xp.asarray(labels)
        ls = shape_of(labels)
    if ls == (n,):
        if all_finite(labels) is not None:
            values = to_numpy(labels)
            if values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= c:
                raise ValueError(
                    f"labels (N,) must be class indices in [0, {c}), got {values.dtype} values {values[:5]}")
        index = xp.asarray(labels, device=array_api_compat.device(like))
        classes = xp.arange(c, device=array_api_compat.device(like))
        return xp.astype(xp.astype(index, classes.dtype)[:, None] == classes[None, :], like.dtype)
    if ls != (n, c):
        raise ValueError(f"labels must be class indices (N,) = ({n},) or multi-hot (N, C) = {(n, c)}, got shape {ls}")
    _, (y,) = as_float_arrays(labels=labels)
    if all_finite(y) is not None:
        values = to_numpy(y)
        if not ((values == 0) | (values == 1)).all() or (values.sum(axis=1) == 0).any():
            raise ValueError("labels (N, C) must be multi-hot: 0 or 1, with at least one 1 per row")
    return xp.astype(y, like.dtype)


def self_guided_loss(classification_loss: Array, mining_loss: Array, *, alpha: float = ALPHA) -> Array:
    r"""Eq. 6: :math:`L_{self} = L_{cl} + \alpha L_{am}` (the paper's :math:`\alpha = 1`)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < math.inf:
        raise ValueError(f"alpha (the weight of L_am) must be a finite number >= 0, got {alpha!r}")
    return classification_loss + float(alpha) * mining_loss


def external_supervision_loss(maps: Array, masks: Array, present: Array | None = None) -> Array:
    r"""Eq. 7: :math:`L_e = \frac1n \sum_c (A^c - H^c)^2`, a mean over pixels and labelled examples.

    The normalised maps :math:`A^c` are upsampled (half-pixel bilinear) to the masks' size and
    compared pixel by pixel with the pixel-level labels :math:`H^c`; the squared difference is
    averaged over the pixels (so that the weight ``w_e`` does not depend on the image size) and
    over the examples that have a mask.

    Args:
      maps: normalised maps in [0, 1], ``(N, *s)``.
      masks: :math:`H`, ``(N, *S)`` in [0, 1] (binary segmentations, or soft ones).
      present: optional ``(N,)`` 0/1 flags, 1 where the example has a pixel label; the loss is
        the mean over those (0 when there is none, never NaN). Default: every example.

    Returns:
      A scalar.
    """
    xp, (a, h) = as_float_arrays(maps=maps, masks=masks)
    sa, sh = shape_of(a), shape_of(h)
    if len(sa) < 2 or 0 in sa:
        raise ValueError(f"maps must have shape (N, *s) with no empty axis, got {sa}")
    if len(sh) != len(sa) or sh[0] != sa[0] or 0 in sh:
        raise ValueError(f"masks must have shape (N, *S) with N and rank of maps {sa} and no empty axis, "
                         f"got masks of shape {sh}")
    _check_unit_range("masks", h, "")
    _check_unit_range("maps", a, " (normalise them first: gradcam_ref.gain.normalize_maps)")
    per_pixel = (upsample(a, sh[1:]) - h) ** 2
    per_example = xp.mean(xp.reshape(per_pixel, (sa[0], -1)), axis=1)
    if present is None:
        return xp.mean(per_example)
    _, (p,) = as_float_arrays(present=present)
    same_library(maps=a, present=p)
    if shape_of(p) != (sa[0],):
        raise ValueError(f"present must have shape (N,) = ({sa[0]},), got {shape_of(p)}")
    _check_unit_range("present", p, "")
    p = xp.astype(p, per_example.dtype)
    count = xp.sum(p)
    return xp.sum(p * per_example) / xp.maximum(count, xp.ones_like(count))


def gain_ext_loss(
    classification_loss: Array, mining_loss: Array, supervision_loss: Array,
    *, alpha: float = ALPHA, w_e: float = W_E,
) -> Array:
    r"""Eq. 8: :math:`L_{ext} = L_{cl} + \alpha L_{am} + w_e L_e` (the paper's :math:`\alpha = 1`, :math:`w_e = 10`).

    :math:`w_e` is the paper's second :math:`\omega`; it is named apart from the mask sharpness.
    """
    if isinstance(w_e, bool) or not isinstance(w_e, numbers.Real) or not 0.0 <= w_e < math.inf:
        raise ValueError(f"w_e (the weight of L_e) must be a finite number >= 0, got {w_e!r}")
    return self_guided_loss(classification_loss, mining_loss, alpha=alpha) + float(w_e) * supervision_loss
