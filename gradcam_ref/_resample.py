r"""The one resampling engine: every resize in gradcam_ref (``upsample``, every convention) is here.

A resize is done axis by axis; an axis of length ``n_in`` becomes ``n_out`` samples, sample i
read at the source position :math:`s_i` given by the kernel (:data:`KERNELS`), linearly between
the two neighbours (or the nearest one). Positions are computed in NumPy on the host (they
depend only on the sizes); the values stay in the array's library, dtype and device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradcam_ref._arrays import Array, device_of, shape_of

KERNELS = ("linear-half-pixel", "linear-corner", "nearest-floor", "cubic-tf")
"""Bilinear with half-pixel centres, linear with aligned corners, torch's nearest, TensorFlow's bicubic."""

_TABLE_SIZE = 1024
"""TensorFlow's bicubic reads its weights from a table of 1025 fractions (resize_bicubic_op.cc)."""


def source_positions(n_in: int, n_out: int, kernel: str) -> np.ndarray:
    r"""Where output sample i of an axis reads its input, ``(n_out,)``.

    - ``"linear-half-pixel"``: :math:`s_i = \max(0, (i + \frac12) n_{in}/n_{out} - \frac12)`
      (torch ``align_corners=False``, cv2 ``INTER_LINEAR``, ``jax.image.resize``);
    - ``"linear-corner"``: :math:`s_i = i (n_{in} - 1) / (n_{out} - 1)`, 0 when
      :math:`n_{out} = 1` (``scipy.ndimage.zoom(order=1)``, torch ``align_corners=True``);
    - ``"nearest-floor"``: :math:`\lfloor i s \rfloor` with :math:`s = n_{in}/n_{out}`, the
      product in float32, as torch's ``F.interpolate(mode="nearest")`` computes it (int64);
    - ``"cubic-tf"``: :math:`s_i = (i + \frac12) n_{in}/n_{out} - \frac12` in float32, read by
      :func:`cubic_taps` (``tf.image.resize(method="bicubic")``).
    """
    if kernel == "linear-half-pixel":
        return np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    if kernel == "linear-corner":
        step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        return np.arange(n_out, dtype=np.float64) * step
    if kernel == "nearest-floor":
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    if kernel == "cubic-tf":
        scale = np.float32(n_in) / np.float32(n_out)
        return (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def resize_axis(xp: Any, x: Array, axis: int, n_out: int, kernel: str) -> Array:
    """``x`` resized along ``axis`` to ``n_out`` samples with ``kernel``; ``x`` itself if unchanged."""
    n_in = shape_of(x)[axis]
    if n_in == n_out:
        return x
    source = source_positions(n_in, n_out, kernel)
    device = device_of(x)
    take = lambda index: xp.take(x, xp.asarray(index, device=device), axis=axis)  # noqa: E731
    if kernel == "nearest-floor":
        return take(source)
    if kernel == "cubic-tf":
        indices, weights = cubic_taps(source, n_in)
        shape = (n_out,) + (1,) * (x.ndim - axis - 1)
        out = None
        for j in range(4):
            w = xp.reshape(xp.asarray(weights[:, j], dtype=x.dtype, device=device), shape)
            term = w * take(indices[:, j])
            out = term if out is None else out + term
        return out
    source = np.clip(source, 0.0, n_in - 1)
    lo = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    shape = (n_out,) + (1,) * (x.ndim - axis - 1)
    w_hi = xp.reshape(xp.asarray(source - lo, dtype=x.dtype, device=device), shape)
    w_lo = xp.reshape(xp.asarray(1.0 - (source - lo), dtype=x.dtype, device=device), shape)
    a, b = take(lo), take(hi)
    # (1 - t) a + t b cannot overflow, but its rounding can leave [min(a, b), max(a, b)] (two halves
    # of a subnormal round to 0): clamp to the neighbours, which the exact value never leaves.
    return xp.minimum(xp.maximum(w_lo * a + w_hi * b, xp.minimum(a, b)), xp.maximum(a, b))


def cubic_taps(source: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    r"""TensorFlow's bicubic taps: indices and weights ``(n_out, 4)`` for source positions ``s``.

    Keys' cubic convolution with :math:`a = -\frac12` (Keys 1981),
    :math:`W(t) = (a+2)|t|^3 - (a+3)|t|^2 + 1` for :math:`|t| \le 1`,
    :math:`a|t|^3 - 5a|t|^2 + 8a|t| - 4a` for :math:`1 < |t| < 2`, on the four samples
    :math:`\lfloor s \rfloor - 1 \ldots \lfloor s \rfloor + 2`, as ``resize_bicubic`` with
    ``half_pixel_centers`` computes it: the fraction :math:`s - \lfloor s \rfloor` is rounded to
    a multiple of 1/1024 (a float32 table), samples outside ``[0, n_in)`` get weight 0 and the
    four weights are divided by their sum.
    """
    a = np.float32(-0.5)
    grid = np.arange(_TABLE_SIZE + 1, dtype=np.float64) / _TABLE_SIZE
    near = (((a + 2) * grid.astype(np.float32) - (a + 3)) * grid.astype(np.float32) ** 2 + 1).astype(np.float32)
    far_x = (grid + 1.0).astype(np.float32)
    far = (((a * far_x - 5 * a) * far_x + 8 * a) * far_x - 4 * a).astype(np.float32)
    base = np.floor(source).astype(np.int64)
    offset = np.rint((source - base).astype(np.float32) * np.float32(_TABLE_SIZE)).astype(np.int64)
    weights = np.stack([far[offset], near[offset], near[_TABLE_SIZE - offset], far[_TABLE_SIZE - offset]], axis=1)
    unbounded = base[:, None] + np.arange(-1, 3)[None, :]
    indices = np.clip(unbounded, 0, n_in - 1)
    weights = np.where(indices == unbounded, weights, np.float32(0)).astype(np.float64)
    return indices, weights / weights.sum(axis=1, keepdims=True)


def resize(xp: Any, x: Array, size: tuple[int, ...], kernel: str) -> Array:
    """The trailing ``len(size)`` axes of ``x`` resized to ``size``, the last axis first."""
    for axis in range(x.ndim - 1, x.ndim - len(size) - 1, -1):
        x = resize_axis(xp, x, axis, int(size[axis - x.ndim]), kernel)
    return x


def parse_size(
    size: Any, rank: int, *, spatial: tuple[int, ...] | None = None, optional: bool = False
) -> tuple[int, ...]:
    """``size`` as ``rank`` positive ints: an int (for every axis) or a sequence of ``rank`` ints.

    Booleans are refused (``True`` is not a size); NumPy integers, 0-d integer arrays and 1-D
    arrays are accepted.
    Anything else is a ValueError naming ``size``, the expected and the actual value (and the
    maps' ``spatial`` shape when given; ``optional`` says that None was allowed too).
    """
    values: Any = None
    if isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)):
        values = (size,) * rank
    elif isinstance(size, np.ndarray) and size.ndim == 0 and size.dtype.kind in "iu":
        values = (size.item(),) * rank  # like the NumPy integer it holds
    elif isinstance(size, np.ndarray) and size.ndim == 1:
        values = size.tolist()
    elif isinstance(size, Sequence) and not isinstance(size, str):
        values = size
    if values is None or len(values) != rank or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) and s >= 1 for s in values
    ):
        where = "" if spatial is None else f" of the maps, whose spatial shape is {spatial}"
        raise ValueError(
            f"size must be {'None, ' if optional else ''}a positive int or {rank} positive int{'s' * (rank > 1)} "
            f"(one per spatial axis{where}), got {size!r}"
        )
    return tuple(int(s) for s in values)
