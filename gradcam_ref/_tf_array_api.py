"""An array-API namespace for ``tf.Tensor`` (array-api-compat has none), so the core's math runs on them.

``gradcam_ref._arrays.namespace`` returns :func:`namespace` for ``tf.Tensor`` arguments; every
function the core calls is here, written with plain TensorFlow ops that also trace into a
``tf.function`` (the TensorFlow backend runs Eq. 1-2 inside its compiled program). Results keep the
tensors' dtype (a float64 model's maps are float64 throughout). TensorFlow itself is never imported
here: this module is used only for tensors that already exist, taken from ``sys.modules``.
Differences from the standard that the core does not rely on are not hidden: there is no device
argument (``device`` is accepted and ignored, TensorFlow places ops itself) and no in-place update.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np


def is_tensorflow_array(x: Any) -> bool:
    """Whether ``x`` is a ``tf.Tensor`` (eager or symbolic), without importing TensorFlow."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.Tensor)


_NAMESPACE: Any = None


def namespace() -> Any:
    """The namespace (built once, when the first tensor is seen)."""
    global _NAMESPACE
    if _NAMESPACE is None:
        _NAMESPACE = _build(sys.modules["tensorflow"])
    return _NAMESPACE


def _build(tf: Any) -> Any:  # noqa: C901  (one flat list of small functions)
    def _axes(axis: Any) -> Any:
        return list(axis) if isinstance(axis, tuple) else axis

    def _like(value: Any, dtype: Any) -> Any:
        """A Python scalar (or array) as a tensor of ``dtype``; a tensor as it is."""
        return value if isinstance(value, tf.Tensor) else tf.constant(value, dtype=dtype)

    def _dtype_of(*values: Any) -> Any:
        for v in values:
            if isinstance(v, tf.Tensor):
                return v.dtype
        return None

    def isdtype(dtype: Any, kind: Any) -> bool:
        if isinstance(kind, tuple):
            return any(isdtype(dtype, k) for k in kind)
        if not isinstance(kind, str):
            return dtype == kind
        return {
            "bool": dtype == tf.bool,
            "signed integer": dtype.is_integer and not dtype.is_unsigned,
            "unsigned integer": dtype.is_integer and dtype.is_unsigned,
            "integral": dtype.is_integer,
            "real floating": dtype.is_floating,
            "complex floating": dtype.is_complex,
            "numeric": dtype.is_integer or dtype.is_floating or dtype.is_complex,
        }[kind]

    def result_type(*items: Any) -> Any:
        dtypes = [i.dtype if isinstance(i, tf.Tensor) else i for i in items]
        if all(d == dtypes[0] for d in dtypes):
            return dtypes[0]
        return tf.as_dtype(np.result_type(*(tf.as_dtype(d).as_numpy_dtype for d in dtypes)))

    def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
        if isinstance(obj, tf.Tensor):
            return obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
        return tf.convert_to_tensor(np.asarray(obj, dtype=None if dtype is None else tf.as_dtype(dtype).as_numpy_dtype))

    def where(condition: Any, x1: Any, x2: Any) -> Any:
        dtype = _dtype_of(x1, x2)
        return tf.where(condition, _like(x1, dtype), _like(x2, dtype))

    def clip(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002  (the standard's names)
        if min is not None:
            x = tf.maximum(x, _like(min, x.dtype))
        if max is not None:
            x = tf.minimum(x, _like(max, x.dtype))
        return x

    def full_like(x: Any, fill_value: Any, dtype: Any = None, device: Any = None) -> Any:
        return tf.fill(tf.shape(x), tf.constant(fill_value, dtype=dtype or x.dtype))

    def zeros(shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return tf.zeros(shape, dtype=dtype or tf.float32)

    def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None, device: Any = None) -> Any:
        if stop is None:
            start, stop = 0, start
        return tf.range(start, stop, step, dtype=dtype or tf.int64)

    def reduction(fn: Any) -> Any:
        def reduce(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
            return fn(x, axis=_axes(axis), keepdims=keepdims)

        return reduce

    def argmax(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        if axis is None:
            x, axis = tf.reshape(x, (-1,)), 0
        out = tf.argmax(x, axis=axis)
        return tf.expand_dims(out, axis) if keepdims else out

    def squeeze(x: Any, axis: Any) -> Any:
        return tf.squeeze(x, axis=_axes(axis))

    def take_along_axis(x: Any, indices: Any, axis: int = -1) -> Any:
        axis = axis % x.shape.rank
        moved = tf.experimental.numpy.moveaxis
        return moved(tf.gather(moved(x, axis, -1), moved(indices, axis, -1), batch_dims=x.shape.rank - 1), -1, axis)

    def svd(x: Any, full_matrices: bool = True) -> tuple[Any, Any, Any]:
        s, u, v = tf.linalg.svd(x, full_matrices=full_matrices)
        return u, s, tf.linalg.adjoint(v)  # the standard's (U, S, Vh)

    def info() -> Any:
        return SimpleNamespace(default_dtypes=lambda device=None: {
            "real floating": tf.float32, "complex floating": tf.complex64, "integral": tf.int64,
            "indexing": tf.int64})

    return SimpleNamespace(
        __name__="gradcam_ref._tf_array_api",
        bool=tf.bool, int8=tf.int8, int16=tf.int16, int32=tf.int32, int64=tf.int64, uint8=tf.uint8,
        float16=tf.float16, float32=tf.float32, float64=tf.float64,
        isdtype=isdtype, result_type=result_type, finfo=lambda dtype: np.finfo(tf.as_dtype(dtype).as_numpy_dtype),
        astype=lambda x, dtype, copy=True, device=None: x if x.dtype == dtype else tf.cast(x, dtype),
        asarray=asarray,
        reshape=lambda x, shape, copy=None: tf.reshape(x, shape),
        expand_dims=lambda x, axis=0: tf.expand_dims(x, axis),
        squeeze=squeeze,
        broadcast_to=tf.broadcast_to,
        permute_dims=lambda x, axes: tf.transpose(x, axes),
        matrix_transpose=tf.linalg.matrix_transpose,
        stack=lambda arrays, axis=0: tf.stack(list(arrays), axis=axis),
        concat=lambda arrays, axis=0: tf.concat(list(arrays), axis=axis),
        sum=reduction(tf.reduce_sum), mean=reduction(tf.reduce_mean), max=reduction(tf.reduce_max),
        min=reduction(tf.reduce_min), any=reduction(tf.reduce_any), all=reduction(tf.reduce_all),
        argmax=argmax,
        abs=tf.abs, exp=tf.exp, sqrt=tf.sqrt, tanh=tf.tanh, isfinite=tf.math.is_finite, ceil=tf.math.ceil,
        log2=lambda x: tf.math.log(x) / tf.math.log(tf.constant(2.0, dtype=x.dtype)),
        maximum=lambda x1, x2: tf.maximum(x1, _like(x2, _dtype_of(x1, x2))),
        minimum=lambda x1, x2: tf.minimum(x1, _like(x2, _dtype_of(x1, x2))),
        where=where, clip=clip,
        ones_like=lambda x, dtype=None, device=None: tf.ones_like(x, dtype=dtype),
        zeros_like=lambda x, dtype=None, device=None: tf.zeros_like(x, dtype=dtype),
        full_like=full_like, zeros=zeros, arange=arange,
        take=lambda x, indices, axis=None: tf.gather(x, indices, axis=axis),
        take_along_axis=take_along_axis,
        matmul=tf.linalg.matmul,
        linalg=SimpleNamespace(svd=svd),
        __array_namespace_info__=info,
    )
