"""From a layer-resolution map to a picture: upsampling and normalisation."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import cast

import numpy as np

from gradcam_ref._arrays import Array, as_float_arrays, check_finite, quiet_numpy, shape_of
from gradcam_ref._resample import parse_size, resize

NORMALIZE_METHODS = ("minmax", "max")


@quiet_numpy
def upsample(maps: Array, size: int | Sequence[int]) -> Array:
    r"""Resize maps by linear interpolation along each spatial axis, with half-pixel centres.

    Output position i of an axis of length ``n_out`` reads the input at

    .. math::

        s_i = \max\Big(0,\ (i + \tfrac12)\,\frac{n_{in}}{n_{out}} - \tfrac12\Big), \qquad
        \text{out}_i = (1 - (s_i - \lfloor s_i \rfloor))\, x_{\lfloor s_i \rfloor}
                     + (s_i - \lfloor s_i \rfloor)\, x_{\min(\lfloor s_i \rfloor + 1,\, n_{in} - 1)}

    and the axes are done one after the other, the last first. These are the numbers of torch
    ``F.interpolate(mode="linear"/"bilinear"/"trilinear", align_corners=False)`` and of OpenCV's
    ``INTER_LINEAR``; upsampling ``[0, 1]`` by 2 gives ``[0, .25, .75, 1]``. No antialiasing
    when shrinking (as torch's default). The result stays inside the input's range.

    Args:
      maps: shape ``(N, *spatial)``, e.g. the output of :func:`grad_cam`; more leading axes
        (``(N, T, *spatial)``) are batch axes when ``size`` is a sequence.
      size: the new spatial shape. A sequence resizes the trailing ``len(size)`` axes; an int
        resizes every axis after the first to that length.

    Returns:
      The resized maps, shape ``maps.shape[:-len(size)] + tuple(size)``.

    Example:
      >>> import numpy as np
      >>> upsample(np.array([[0.0, 1.0]]), (4,))
      array([[0.  , 0.25, 0.75, 1.  ]])
    """
    xp, (x,) = as_float_arrays(maps=maps)
    shape = shape_of(x)
    listed = isinstance(size, (Sequence, np.ndarray)) and not isinstance(size, str) and np.ndim(size) == 1
    rank = len(cast(Sized, size)) if listed and len(cast(Sized, size)) else max(len(shape) - 1, 1)
    size = parse_size(size, rank)
    if len(shape) < len(size) + 1:
        raise ValueError(
            f"maps must have a batch axis before the {len(size)} spatial axes of size {size}, "
            f"got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(f"maps must not be empty, got shape {shape}")
    x = resize(xp, x, size, "linear-half-pixel")
    check_finite(x, "upsample", maps=maps)
    return x


@quiet_numpy
def normalize(
    maps: Array, method: str = "minmax", *, axis: int | Sequence[int] | None = None
) -> Array:
    r"""Scale each map for display; a flat map becomes zeros, never NaN.

    ``"minmax"``: :math:`(x - \min x) / (\max x - \min x)`, into ``[0, 1]``.
    ``"max"``: :math:`x / \max |x|`, which keeps zero at zero (``[0, 1]`` for ReLU maps,
    ``[-1, 1]`` for signed ones).

    The minimum and maximum are taken per map, over ``axis``. A map whose span (or maximum) is
    0 comes out as zeros, and only then (a span of subnormal numbers is a span). A span wider
    than the dtype's largest number is computed on halved values, so that it cannot overflow.

    Args:
      maps: shape ``(N, *spatial)``; NaN or Inf raise.
      method: ``"minmax"`` or ``"max"``.
      axis: the axes one map spans; default every axis but the first, so ``(N, *spatial)``
        gives N maps. For ``(N, T, *spatial)`` pass the spatial axes, e.g. ``(-2, -1)``.

    Returns:
      The normalised maps, same shape.

    Example:
      >>> import numpy as np
      >>> normalize(np.array([[1.0, 3.0], [2.0, 2.0]]))
      array([[0., 1.],
             [0., 0.]])
    """
    if not isinstance(method, str) or method not in NORMALIZE_METHODS:
        raise ValueError(f"method must be one of {NORMALIZE_METHODS}, got {' '.join(repr(method).split())}")
    xp, (x,) = as_float_arrays(maps=maps)
    if x.ndim < 2 or 0 in shape_of(x):
        raise ValueError(f"maps must have shape (N, *spatial) and no empty axis, got {shape_of(x)}")
    axes = tuple(range(1, x.ndim)) if axis is None else _as_axes(axis, x.ndim)
    if method == "max":
        scale = xp.max(xp.abs(x), axis=axes, keepdims=True)
        check_finite(scale, "normalize", maps=x)
        eighth = _eighth_where_huge(xp, scale, scale)
        return _safe_divide(xp, x * eighth, scale * eighth)
    low = xp.min(x, axis=axes, keepdims=True)
    high = xp.max(x, axis=axes, keepdims=True)
    check_finite(low * 0 + high * 0, "normalize", maps=x)  # NaN iff NaN or Inf in maps (inf * 0)
    eighth = _eighth_where_huge(xp, high - low, low)
    return _safe_divide(xp, x * eighth - low * eighth, high * eighth - low * eighth)


def _eighth_where_huge(xp, span: Array, like: Array) -> Array:
    """1/8 for the maps whose ``span`` exceeds 1 / (the dtype's smallest normal number), 1 elsewhere.

    Such a span may have overflowed (wider than the dtype's largest number), and its reciprocal
    is subnormal, which XLA flushes to zero where it divides as ``x * (1 / span)``. An eighth of
    any span fits below that bound; scaling by a power of two is exact, so every quotient the
    dtype can hold is the same number. The other maps keep every bit, subnormal spans included.
    """
    bound = 1.0 / float(xp.finfo(like.dtype).smallest_normal)
    huge = ~(span <= bound)  # also inf
    return xp.where(huge, xp.full_like(like, 0.125), xp.ones_like(like))


def _safe_divide(xp, numerator: Array, denominator: Array) -> Array:
    positive = denominator > 0
    safe = xp.where(positive, denominator, xp.ones_like(denominator))
    return xp.where(positive, numerator / safe, xp.zeros_like(numerator))


def _as_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    listed = isinstance(axis, Sequence) or (isinstance(axis, np.ndarray) and axis.ndim == 1)
    if isinstance(axis, (bool, np.bool_, str, bytes)) or not (isinstance(axis, (int, np.integer)) or listed):
        raise TypeError(f"axis must be an int or a sequence of ints, got {' '.join(repr(axis).split())}")
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if any(isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) for a in axes):
        raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")
    if not axes or any(not -ndim <= a < ndim for a in axes) or 0 in [a % ndim for a in axes]:
        raise ValueError(
            f"axis must name spatial axes of maps (not the batch axis 0) in [-{ndim}, {ndim}), "
            f"got {axis}"
        )
    if len({a % ndim for a in axes}) < len(axes):
        raise ValueError(f"axis must name distinct spatial axes of maps, got {axis}")
    return tuple(sorted(a % ndim for a in axes))
