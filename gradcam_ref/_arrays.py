"""Argument checks shared by the core functions: one place for every error message.

The core accepts NumPy, torch and JAX arrays (anything array-api-compat knows) and ``tf.Tensor``
(:mod:`gradcam_ref._tf_array_api`, looked up here: use :func:`namespace`, :func:`is_array` and
:func:`device`, not array-api-compat's functions, in the core). NumPy input
(and plain Python sequences) is computed in float64; other libraries keep their floating dtype,
device and autograd graph. Nothing here imports a framework.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import array_api_compat
import numpy as np

from gradcam_ref import _tf_array_api

Array = Any
"""Any array the core accepts: ``numpy.ndarray``, ``torch.Tensor``, ``jax.Array``."""


quiet_numpy = np.errstate(over="ignore", invalid="ignore", divide="ignore")
"""Decorator: NumPy's own overflow/invalid warnings are replaced by :func:`check_finite`'s errors."""


def shape_of(x: Array) -> tuple[int, ...]:
    """The shape as a plain tuple of ints (``torch.Size`` prints differently)."""
    return tuple(map(int, x.shape))


_NAMESPACES: dict[type, Any] = {}


def namespace(*arrays: Array) -> Any:
    """``array_api_compat.array_namespace(*arrays)``, remembered per array type.

    The lookup tries every library it knows in turn; the answer depends only on the type, except
    for NumPy's (an ndarray of JAX's ``float0`` dtype belongs to JAX), which is looked up each time.
    """
    kind = type(arrays[0])
    xp = _NAMESPACES.get(kind)
    if xp is not None and all(type(x) is kind for x in arrays):
        return xp
    if any(_tf_array_api.is_tensorflow_array(x) for x in arrays):
        if not all(_tf_array_api.is_tensorflow_array(x) for x in arrays):
            raise TypeError(f"Multiple namespaces for array inputs: {sorted({type(x).__name__ for x in arrays})}")
        xp = _tf_array_api.namespace()
    else:
        xp = array_api_compat.array_namespace(*arrays)
    if all(type(x) is kind for x in arrays) and not kind.__module__.startswith("numpy"):
        _NAMESPACES[kind] = xp
    return xp


def is_array(x: Any) -> bool:
    """``array_api_compat.is_array_api_obj``, ``tf.Tensor`` included."""
    return array_api_compat.is_array_api_obj(x) or _tf_array_api.is_tensorflow_array(x)


def device_of(x: Array) -> Any:
    """``array_api_compat.device``; None for ``tf.Tensor`` (TensorFlow places ops itself)."""
    return None if _tf_array_api.is_tensorflow_array(x) else array_api_compat.device(x)


def as_float_arrays(**named: Any) -> tuple[Any, list[Array]]:
    """Return ``(xp, arrays)``: the arrays' shared namespace and the arrays as floats.

    Each keyword is an argument of the caller, so that errors can name it. NumPy arrays and
    Python sequences become float64 NumPy arrays (no copy when they already are). Arrays of other
    libraries keep their floating dtype; integer ones are promoted to that library's default
    floating dtype. Boolean, complex, string and object arrays are refused.
    """
    values = list(named.values())
    first = values[0]
    xp = _NAMESPACES.get(type(first))  # fast path: one known non-NumPy type, one floating dtype
    if xp is not None and all(type(v) is type(first) and v.dtype == first.dtype for v in values) \
            and xp.isdtype(first.dtype, "real floating"):
        return xp, values
    arrays = {}
    for name, value in named.items():
        if not is_array(value):
            try:
                value = np.asarray(value)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"{name} must be an array, got {type(value).__name__}: {error}"
                ) from None
        arrays[name] = value
    xp = same_library(**arrays)

    converted = []
    for name, value in arrays.items():
        dtype = value.dtype
        if array_api_compat.is_numpy_array(value):
            if dtype.kind not in "fiu":
                raise TypeError(f"{name} must have a real numeric dtype, got {dtype}")
            converted.append(np.asarray(value, dtype=np.float64))
        elif xp.isdtype(dtype, "real floating"):
            converted.append(value)
        elif xp.isdtype(dtype, "integral"):
            converted.append(xp.astype(value, _default_float(xp, value)))
        else:
            raise TypeError(f"{name} must have a real numeric dtype, got {dtype}")
    common = xp.result_type(*(x.dtype for x in converted))
    return xp, [x if x.dtype == common else xp.astype(x, common) for x in converted]


def same_library(**named: Array) -> Any:
    """The arrays' shared namespace; a TypeError naming each argument's library where they differ."""
    try:
        return namespace(*named.values())
    except TypeError:
        kinds = ", ".join(f"{name}: {type(v).__module__}.{type(v).__name__}" for name, v in named.items())
        raise TypeError(f"arrays must all come from one library, got {kinds}") from None


def _default_float(xp: Any, x: Array) -> Any:
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=device_of(x))["real floating"]


def widen_half(xp: Any, *arrays: Array) -> list[Array]:
    """The arrays in float32 where their dtype is narrower (float16, bfloat16); else as they are.

    The one place where the core widens half precision: reductions whose intermediates leave its
    range (a sum of activations past float16's 65504, squares and cubes of gradients below 1e-4,
    ``2 / g`` past 65504) are computed on the widened arrays and their (small) result cast back
    with ``xp.astype(result, dtype)``. float32 holds every float16 and bfloat16 value exactly, and
    its range every sum, square and cube of them that the core forms. Autograd follows the casts.
    """
    if xp.finfo(arrays[0].dtype).bits >= 32:
        return list(arrays)
    return [xp.astype(x, xp.float32) for x in arrays]


def power_of_two_at_least(xp: Any, m: Array) -> Array:
    r""":math:`2^e \ge m` elementwise (1 where m is 0): dividing by it is exact (no rounding).

    The exponent is clipped to those of the normal numbers whose reciprocals are normal too (for
    float64, :math:`2^{-1022}` to :math:`2^{1022}`): XLA divides as ``x * (1 / 2^e)`` and flushes a
    subnormal reciprocal to zero. So ``|m / 2^e| <= 1``, except for m past :math:`2^{1022}`
    (< 4). Scaling by a power of two commutes with rounding: a computation on ``x / 2^e`` gives the
    same bits, times :math:`2^{-e}`, as on ``x`` wherever neither under- nor overflows.
    """
    info = xp.finfo(m.dtype)
    safe = xp.where(m > 0, m, xp.ones_like(m))
    e = xp.ceil(xp.log2(safe))
    lowest = math.frexp(float(info.smallest_normal))[1] - 1  # -1022 for float64
    e = xp.clip(e, float(lowest), float(-lowest))  # 2^e and 2^-e normal numbers
    two = xp.asarray(2.0, dtype=m.dtype, device=device_of(m))
    return two ** e


def check_feature_maps(name: str, x: Array, layout: str = "(N, K, *spatial)") -> None:
    """Refuse arrays without a batch axis, a channel axis and at least one spatial axis."""
    shape = shape_of(x)
    if len(shape) < 3:
        raise ValueError(
            f"{name} must have shape {layout} with at least one spatial axis, "
            f"got shape {shape} (rank {len(shape)})"
        )
    if 0 in shape:
        raise ValueError(
            f"{name} must not be empty (N, K and every spatial size >= 1), got shape {shape}"
        )


def shown(value: Any) -> str:
    """``repr(value)`` on one line (an array's repr spans several): for error messages."""
    return " ".join(repr(value).split())


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the names ``choices``; else a one-line ValueError naming ``name``.

    The type is checked first: ``array in choices`` would ask for the array's truth value.
    Two choices read ``'a' or 'b'``; more, ``one of`` the sequence as given (a tuple or a list).
    """
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(map(repr, choices)) if len(choices) == 2 else f"one of {choices!r}"
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")
    return value


def check_positive(name: str, value: Any) -> None:
    """Refuse anything but a finite real number > 0: a bool, a string, None, NaN and inf are named."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a finite number > 0, got {shown(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@overload
def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "", *,
              none: Literal[False] = False, type_error: type[Exception] = TypeError) -> int: ...


@overload
def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "", *,
              none: bool, type_error: type[Exception] = TypeError) -> int | None: ...


def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "", *,
              none: bool = False, type_error: type[Exception] = TypeError) -> int | None:
    """``value`` as an int in [low, high) (no upper bound for None); a TypeError for a bool, a float
    or anything else that is not an int, a ValueError out of range. ``note`` follows the range.

    With ``none``, None is accepted too (and returned), and the messages say so. ``type_error`` is
    the exception for a value that is not an int, where an argument has always raised another
    (ValueError) for every refused value.
    """
    if value is None and none:
        return None
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    expected += " or None" * none
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise type_error(f"{name} must be {expected}{note}, got {shown(value)}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}{note}, got {value!r}")
    return int(value)


def check_spatial_rank(spatial_rank: Any, shape: tuple[int, ...], name: str) -> int:
    """The number of trailing spatial axes of array ``name`` of ``shape``: ``spatial_rank``, an int in
    [1, ndim - 1] (a batch axis first), or every axis but the first when it is None."""
    if spatial_rank is None and len(shape) >= 2:
        return len(shape) - 1
    if isinstance(spatial_rank, (bool, np.bool_)) or not isinstance(spatial_rank, (int, np.integer)) \
            or not 1 <= spatial_rank < len(shape):
        raise ValueError(f"spatial_rank must be an int in [1, {len(shape) - 1}] for {name} of shape {shape} "
                         f"(a batch axis first), got {shown(spatial_rank)}")
    return int(spatial_rank)


def check_flag(name: str, value: Any) -> None:
    """Refuse anything but True or False: a string such as ``"no"`` would read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")


def check_nonnegative(name: str, value: Any) -> None:
    """Refuse anything but a finite real number >= 0: a bool, a string, NaN and inf are named."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a finite number >= 0, got {shown(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_gradients_match(activations: Array, gradients: Array, name: str = "gradients",
                          samples: bool = False) -> bool:
    """Check ``gradients`` against ``activations``; return True for the multi-target layout.

    ``gradients`` is either ``(N, K, *spatial)`` like ``activations`` (one target per example)
    or ``(N, T, K, *spatial)`` (T targets per example, sharing one set of activations); with
    ``samples``, either after a leading axis of n >= 1 samples. Errors name the array ``name``.
    """
    a, g = shape_of(activations), shape_of(gradients)
    n = g[:1] if samples else ()
    if len(g) > len(n) and all(s >= 1 for s in n):
        g = g[len(n):]
        if g == a:
            return False
        if len(g) == len(a) + 1 and g[:1] + g[2:] == a and g[1] >= 1:
            return True
    lead = ("n",) if samples else ()
    raise ValueError(
        f"{name} must have the shape of activations {a}{' after a leading axis of n >= 1 samples' * samples} "
        f"or the multi-target shape ({'n, ' * samples}N, T, K, *spatial) = {lead + (a[0], 'T') + a[1:]}, "
        f"got shape {shape_of(gradients)}"
    )


def to_numpy(x: Array) -> np.ndarray:
    """A NumPy view or copy of any supported array (torch tensors are detached, moved to host;
    bfloat16, which NumPy lacks, becomes float32, which holds every bfloat16 value exactly)."""
    if array_api_compat.is_numpy_array(x):
        return x
    if array_api_compat.is_torch_array(x):  # duck-typed: the core never imports torch
        x = x.detach().cpu()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # NumPy has no bfloat16
    return np.asarray(x)


def has_no_data(x: Array) -> bool:
    """True for arrays that hold shapes but no values: torch's meta device and fake tensors."""
    return bool(getattr(x, "is_meta", False)) or type(x).__name__ == "FakeTensor"


@quiet_numpy
def all_finite(*arrays: Array) -> bool | None:
    """Whether every value of every array is finite; None when the values cannot be read now:
    traced (lazy) arrays, e.g. under ``jax.jit``, and arrays without data (:func:`has_no_data`),
    which go through the core's functions as shapes only.

    One reduction per array and one value read back: NaN and Inf propagate through addition, so
    a finite sum of all the values proves them all finite. A sum that is not finite (a NaN or
    Inf among the values, or a sum that overflowed) is settled value by value.
    """
    if any(has_no_data(x) for x in arrays):
        return None
    xp = namespace(*arrays)
    try:
        total = xp.sum(arrays[0])
        for x in arrays[1:]:
            total = total + xp.sum(x)
        # One value read back: float() is one operation where isfinite is four (torch); a total
        # with an autograd graph is read through isfinite, since torch warns when float() reads it.
        if bool(xp.isfinite(total)) if getattr(total, "requires_grad", False) else math.isfinite(float(total)):
            return True
        return all(bool(xp.all(xp.isfinite(x))) for x in arrays)
    except TypeError:  # a tracer (jax.jit, jax.grad) cannot be read: nothing to check yet
        return None


def check_finite(result: Array, what: str, **inputs: Array) -> None:
    """Raise if ``result`` holds NaN or Inf, naming the input that caused it.

    Checking the (small) result instead of the (large) inputs keeps the check off the hot path:
    a NaN or Inf anywhere in the inputs reaches the result, since every input value is
    multiplied into it. Only when that happens are the inputs searched, to name the culprit.
    """
    if all_finite(result) is not False:
        return
    for name, value in inputs.items():
        if all_finite(value) is False:
            bad = int(np.count_nonzero(~np.isfinite(to_numpy(value))))  # error path: a host copy is fine
            raise ValueError(
                f"{name} contains NaN or Inf ({bad} of {_size(value)} values); "
                f"{what} needs finite {', '.join(inputs)}"
            )
    raise ValueError(
        f"{what} overflowed: the inputs {', '.join(inputs)} are finite but the result is not "
        f"({result.dtype}); {_overflow_hint(result)}"
    )


def _overflow_hint(result: Array) -> str:
    """What to do about an overflow: a wider dtype, unless the result already has the widest."""
    xp = namespace(result)
    if xp.isdtype(result.dtype, "real floating") and xp.finfo(result.dtype).bits >= 64:
        return f"the values exceed {xp.finfo(result.dtype).max:.3g}: rescale the inputs (the maps scale with them)"
    return "compute in a wider dtype (e.g. float64)"


def _size(x: Array) -> int:
    return int(np.prod(shape_of(x), dtype=np.int64))
