"""Every core function on the values where numerical code breaks, against exact rational arithmetic.

The promise (docs/reliability.md): a core function either returns finite numbers that are the
exact result up to rounding, or raises a one-line ValueError naming its argument, and it may
raise only where the result, or a quantity the formula cannot avoid, exceeds the largest float.
No NaN, no Inf, no silent zero. The exact result is computed with :class:`fractions.Fraction`
(every float64 is a rational number), so "up to rounding" is measured against the truth: a map
that an overflow turned to zeros, or a span of subnormals normalised to zeros, fails. Rounding
is IEEE's: a relative error per operation, and an absolute one of the float spacing near 0 for
intermediate weights that underflow (gradual underflow), scaled by the activations they weigh.

A new core function gets a row in :data:`CASES`; the strategies are :mod:`tests.strategies`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import conventions
from tests.strategies import LARGEST, edgy_arrays, feature_maps, map_shapes, values

RTOL = 1e-12  # times the magnitude of the terms summed: a few roundings per term
ATOL = 1e-300  # below this, underflow of products of subnormals is rounding too
TINY = Fraction(5e-324)  # the spacing of floats near 0: the absolute error of a weight that underflows
LIMIT = Fraction(LARGEST) / 4  # above this, an overflow error is legitimate


def exact(x: np.ndarray) -> np.ndarray:
    """The float64 array as an object array of exact fractions."""
    out = np.empty(x.shape, dtype=object)
    for index, v in np.ndenumerate(x):
        out[index] = Fraction(float(v))
    return out


def fabs(x):
    return np.vectorize(abs, otypes=[object])(x)


def spatial_sum(x: np.ndarray, lead: int) -> np.ndarray:
    return x.reshape(x.shape[:lead] + (-1,)).sum(axis=-1)


def weighted(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_k w[..., k] a[:, k]: a (N, K, *S), w (N, K) or (N, T, K) -> (N, *S) or (N, T, *S)."""
    if w.ndim == 2:
        return np.einsum("nk,nk...->n...", w, a)
    return np.einsum("ntk,nk...->nt...", w, a)


# --- exact references: (values, magnitudes[, floors[, largest intermediate]]) ------------------------
# The magnitude of an output is a bound on the terms the computation adds up (times their
# condition): the rounding error is at most a small multiple of eps times it. The floor is the
# absolute error of intermediates that underflow; the largest intermediate (Grad-CAM++'s
# weights) must be representable for a result to be owed.


def ref_neuron_importance(g):
    z = math.prod(g.shape[2:])
    return spatial_sum(exact(g), 2) / z, spatial_sum(fabs(exact(g)), 2) / z


def ref_grad_cam(a, g, relu=True):
    multi = g.ndim == a.ndim + 1
    z = math.prod(a.shape[2:])
    lead = 3 if multi else 2
    alpha, alpha_mag = spatial_sum(exact(g), lead) / z, spatial_sum(fabs(exact(g)), lead) / z
    signed = weighted(exact(a), alpha)
    magnitude = weighted(fabs(exact(a)), alpha_mag)
    floor = weighted(fabs(exact(a)), np.full(alpha.shape, (z + 2) * TINY, dtype=object))  # alpha's underflow
    return (np.vectorize(lambda v: max(v, Fraction(0)), otypes=[object])(signed) if relu else signed), magnitude, floor


def ref_cam(a, w):
    return weighted(exact(a), exact(w)), weighted(fabs(exact(a)), fabs(exact(w)))


def ref_grad_cam_plus_plus(a, g, relu=True):
    """w_k = sum_ij g / (2 + S g) over g > 0 (0 where 2 + S g = 0), S = sum_ab A_ab; L = sum_k w_k A^k."""
    multi = g.ndim == a.ndim + 1
    ea, eg = exact(a), exact(g)
    s = spatial_sum(ea, 2)  # (N, K)
    s_mag = spatial_sum(fabs(ea), 2)
    if multi:
        s, s_mag = s[:, None], s_mag[:, None]
    lead = 3 if multi else 2
    flat = eg.reshape(eg.shape[:lead] + (-1,))
    w = np.empty(flat.shape[:-1], dtype=object)
    w_mag = np.empty(flat.shape[:-1], dtype=object)
    s, s_mag = np.broadcast_to(s, w.shape), np.broadcast_to(s_mag, w.shape)
    for index in np.ndindex(*w.shape):
        total, magnitude = Fraction(0), Fraction(0)
        for gij in flat[index]:
            den = 2 + s[index] * gij
            if gij > 0 and den != 0:
                term = gij / den
                total += term
                magnitude += abs(term) * (2 + abs(gij) * s_mag[index]) / abs(den)  # its condition number
        w[index], w_mag[index] = total, magnitude
    maps = weighted(ea, w)
    magnitude = weighted(fabs(ea), w_mag + fabs(w))
    if max(s_mag.flat) > LIMIT:  # the sum of the activations itself cannot be represented
        magnitude = magnitude + Fraction(LARGEST)
    z = flat.shape[-1]
    floor = weighted(fabs(ea), np.full(w.shape, 2 * (z + 2) * TINY, dtype=object))  # the weights' underflow
    maps = np.vectorize(lambda v: max(v, Fraction(0)), otypes=[object])(maps) if relu else maps
    return maps, magnitude, floor, max(abs(v) for v in w.flat)  # the weights must be representable too


def ref_normalize(x, method="minmax"):
    ex = exact(x)
    out = np.empty(x.shape, dtype=object)
    for n in range(x.shape[0]):
        row = ex[n]
        if method == "max":
            top = max(abs(v) for v in row.flat)
            out[n] = row / top if top > 0 else row * 0
        else:
            lo, hi = min(row.flat), max(row.flat)
            out[n] = (row - lo) / (hi - lo) if hi > lo else row * 0
    return out, np.full(x.shape, Fraction(1), dtype=object)  # in [0, 1] or [-1, 1]: never an overflow


def ref_upsample(x, size):
    """Half-pixel linear, axis by axis (last first), with exact source positions."""
    ex, ma = exact(x), fabs(exact(x))
    for axis in range(x.ndim - 1, x.ndim - len(size) - 1, -1):
        n_in, n_out = ex.shape[axis], size[axis - x.ndim]
        rows, mags = [], []
        for i in range(n_out):
            s = max(Fraction(0), (i + Fraction(1, 2)) * Fraction(n_in, n_out) - Fraction(1, 2))
            lo = min(math.floor(s), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            t = s - lo
            rows.append((1 - t) * np.take(ex, [lo], axis=axis) + t * np.take(ex, [hi], axis=axis))
            mags.append(np.take(ma, [lo], axis=axis) + np.take(ma, [hi], axis=axis))
        ex, ma = np.concatenate(rows, axis=axis), np.concatenate(mags, axis=axis)
    return ex, ma


# --- the check ---------------------------------------------------------------------------------


def check(call, reference, names):
    """``call()`` is the exact result up to rounding, or a legitimate one-line overflow error."""
    truth, magnitude, *more = reference()
    floor = more[0] if more else np.zeros(truth.shape, dtype=object)
    bound = max([*magnitude.flat, *more[1:]])  # the largest term, or intermediate the method defines
    try:
        out = call()
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and any(name in message for name in names), message
        assert bound > LIMIT, f"raised although every term is representable (max term {float(bound):.3g}): {message}"
        return
    out = np.asarray(out)
    assert out.shape == truth.shape and out.dtype == np.float64
    assert np.isfinite(out).all(), "NaN or Inf came out instead of an error"
    for index, value in np.ndenumerate(out):
        error = abs(Fraction(float(value)) - truth[index])
        allowed = Fraction(RTOL) * magnitude[index] + Fraction(ATOL) + floor[index]
        assert error <= allowed, (
            f"at {index}: got {value!r}, exact {float(truth[index])!r} (terms up to {float(magnitude[index]):.3g})"
        )


@given(feature_maps(multi=False))
def test_neuron_importance(ag):
    _, g = ag
    check(lambda: gradcam_ref.neuron_importance(g), lambda: ref_neuron_importance(g), ["gradients"])


@given(feature_maps(), st.booleans())
@example((np.zeros((1, 1, 3)), np.full((1, 1, 3), LARGEST)), False)  # the mean fits, the sum does not
def test_grad_cam(ag, relu):
    a, g = ag
    check(lambda: gradcam_ref.grad_cam(a, g, relu=relu), lambda: ref_grad_cam(a, g, relu), ["activations", "gradients"])


@given(feature_maps(), st.booleans())
@example((np.full((1, 1, 1), 1e150), np.full((1, 1, 1), 5e-324)), False)  # a weight that underflows
@example((np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 1e308)), False)  # a weight of 2e308: an error
def test_grad_cam_plus_plus(ag, relu):
    a, g = ag
    check(lambda: gradcam_ref.grad_cam_plus_plus(a, g, relu=relu), lambda: ref_grad_cam_plus_plus(a, g, relu),
          ["activations", "gradients"])


@given(feature_maps(multi=False), st.data())
def test_cam(ag, data):
    a, _ = ag
    w = data.draw(edgy_arrays(a.shape[:2]))
    check(lambda: gradcam_ref.cam(a, w), lambda: ref_cam(a, w), ["activations", "class_weights"])


@given(map_shapes(max_rank=2, max_side=4).flatmap(lambda shape: edgy_arrays(shape)), st.sampled_from(["minmax", "max"]))
def test_normalize(x, method):
    check(lambda: gradcam_ref.normalize(x, method), lambda: ref_normalize(x, method), ["maps"])


@given(map_shapes(max_rank=2, max_side=3).flatmap(lambda shape: edgy_arrays(shape)), st.data())
def test_upsample(x, data):
    size = tuple(data.draw(st.integers(1, 7)) for _ in x.shape[1:])
    check(lambda: gradcam_ref.upsample(x, size), lambda: ref_upsample(x, size), ["maps"])


# --- the cases of the issue, as named examples --------------------------------------------------


def test_grad_cam_plus_plus_does_not_overflow_where_the_map_is_representable():
    import torch

    rng = np.random.default_rng(0)
    a, g = rng.random((1, 3, 4, 4)), rng.standard_normal((1, 3, 4, 4))
    for scale in (1e100, 1e110, 1e200, 1e300):  # g^3 overflowed from 1e103 on: all-zero maps
        check(lambda s=scale: gradcam_ref.grad_cam_plus_plus(a, g * s),
              lambda s=scale: ref_grad_cam_plus_plus(a, g * s), ["gradients"])
    # float16: g of 40 made g^3 overflow, and the map lost half its peak
    a16, g16 = torch.tensor(a, dtype=torch.float16), torch.tensor(g * 40, dtype=torch.float16)
    want = gradcam_ref.grad_cam_plus_plus(a16.double(), g16.double())
    torch.testing.assert_close(gradcam_ref.grad_cam_plus_plus(a16, g16).double(), want, rtol=2e-3, atol=2e-3 * float(want.max()))


def test_normalize_keeps_subnormal_spans_and_huge_spans():
    np.testing.assert_array_equal(gradcam_ref.normalize(np.array([[0.0, 5e-324, 1e-323]])), [[0.0, 0.5, 1.0]])
    np.testing.assert_array_equal(gradcam_ref.normalize(np.array([[-LARGEST, LARGEST, 0.0]])), [[0.0, 1.0, 0.5]])


def test_neuron_importance_of_values_near_the_largest_float():
    np.testing.assert_array_equal(gradcam_ref.neuron_importance(np.full((1, 1, 2, 2), 1e308)), [[1e308]])


def test_overflow_hint_fits_the_dtype():
    import torch

    with pytest.raises(ValueError, match=r"overflowed: .* \(float64\); the values exceed 1.8e\+308: rescale the inputs"):
        gradcam_ref.grad_cam(np.full((1, 2, 2), 1e300), np.full((1, 2, 2), 1e300))
    with pytest.raises(ValueError, match=r"\(torch.float16\); compute in a wider dtype"):
        gradcam_ref.grad_cam(torch.full((1, 2, 2), 300.0, dtype=torch.float16),
                             torch.full((1, 2, 2), 300.0, dtype=torch.float16))


# --- every public function: booleans, strings and empty arrays are refused by name ----------------

MAPS = np.ones((1, 2, 2))
FEATURES = np.ones((1, 2, 2, 2))
PUBLIC = {
    "neuron_importance": lambda bad: gradcam_ref.neuron_importance(bad),
    "grad_cam": lambda bad: gradcam_ref.grad_cam(FEATURES, bad),
    "grad_cam_plus_plus": lambda bad: gradcam_ref.grad_cam_plus_plus(bad, FEATURES),
    "cam": lambda bad: gradcam_ref.cam(FEATURES, bad),
    "normalize": lambda bad: gradcam_ref.normalize(bad),
    "upsample": lambda bad: gradcam_ref.upsample(bad, (3, 3)),
    "guided_grad_cam": lambda bad: gradcam_ref.guided_grad_cam(bad, MAPS),
    "guided_image": lambda bad: gradcam_ref.guided_image(bad),
    "postprocess": lambda bad: conventions.postprocess(bad, "paper"),
    # the CAM family
    "hires_cam": lambda bad: gradcam_ref.hires_cam(FEATURES, bad),
    "xgrad_cam": lambda bad: gradcam_ref.xgrad_cam(FEATURES, bad),
    "xgrad_cam_weights": lambda bad: gradcam_ref.xgrad_cam_weights(FEATURES, bad),
    "layer_cam": lambda bad: gradcam_ref.layer_cam(FEATURES, bad),
    "eigen_cam": lambda bad: gradcam_ref.eigen_cam(bad),
    "eigen_grad_cam": lambda bad: gradcam_ref.eigen_grad_cam(FEATURES, bad),
    "smooth_grad_cam_plus_plus": lambda bad: gradcam_ref.smooth_grad_cam_plus_plus(bad, FEATURES[None]),
    "torchcam_smooth_weights": lambda bad: gradcam_ref.torchcam_smooth_weights(bad, FEATURES[None]),
    "layercam_scale": lambda bad: gradcam_ref.layercam_scale(bad),
    "fuse_maps": lambda bad: gradcam_ref.fuse_maps([bad, MAPS]),
    "score_cam_masks": lambda bad: gradcam_ref.score_cam_masks(bad, (4, 4)),
    "score_cam_weights": lambda bad: gradcam_ref.score_cam_weights(bad),
    "ablated_activations": lambda bad: gradcam_ref.ablated_activations(bad, 0, [0]),
    "ablation_cam_weights": lambda bad: gradcam_ref.ablation_cam_weights(np.ones(1), bad),
    "fem": lambda bad: gradcam_ref.fem(bad),
    "tf_keras_vis_plus_plus_weights": lambda bad: gradcam_ref.tf_keras_vis_plus_plus_weights(FEATURES, bad, np.ones(1)),
}
ARGUMENT = {"neuron_importance": "gradients", "grad_cam": "gradients", "grad_cam_plus_plus": "activations",
            "cam": "class_weights", "normalize": "maps", "upsample": "maps", "guided_grad_cam": "guided_backprop",
            "guided_image": "guided", "postprocess": "signed_maps",
            "hires_cam": "gradients", "xgrad_cam": "gradients", "xgrad_cam_weights": "gradients",
            "layer_cam": "gradients", "eigen_cam": "activations", "eigen_grad_cam": "gradients",
            "smooth_grad_cam_plus_plus": "activations", "torchcam_smooth_weights": "activations",
            "layercam_scale": "maps", "fuse_maps": "maps",
            "score_cam_masks": "activations", "score_cam_weights": "mask_scores",
            "ablated_activations": "activations", "ablation_cam_weights": "ablated_scores",
            "fem": "activations", "tf_keras_vis_plus_plus_weights": "gradients"}


def test_every_public_core_function_is_listed_here():
    """A new public function must join PUBLIC (and, if it computes, the exact checks above)."""
    functions = {name for name in gradcam_ref.__all__ if callable(getattr(gradcam_ref, name))
                 and not isinstance(getattr(gradcam_ref, name), type) and name not in ("explain", "evaluate", "explain_dataset")}
    assert functions | {"postprocess"} == set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
@pytest.mark.parametrize("bad", [
    np.ones((1, 2, 2, 2), dtype=bool), np.array([[["a", "b"]]]), np.zeros((0, 2, 2, 2)),
    np.full((1, 2, 2, 2), np.nan), np.full((1, 2, 2, 2), -np.inf), "text", None,
], ids=["bool", "str-array", "empty", "nan", "inf", "str", "None"])
def test_bad_values_are_refused_by_name(name, bad):
    with pytest.raises((TypeError, ValueError)) as error:
        PUBLIC[name](bad)
    message = str(error.value)
    assert "\n" not in message and ARGUMENT[name] in message, message


@given(values)
def test_a_bool_is_never_a_size_or_an_axis(v):
    with pytest.raises(TypeError, match=r"axis must be an int or a sequence of ints, got True"):
        gradcam_ref.normalize(np.full((1, 2), v), axis=True)
    with pytest.raises((TypeError, ValueError), match=r"size must be .*, got \(True, True\)"):
        gradcam_ref.upsample(np.full((1, 2, 2), v), (True, True))


# --- every public function's options: checked by type before use, refused on one line by name -----

SIGNED_A, SIGNED_G = np.random.default_rng(0).standard_normal((2, 1, 3, 3, 3))  # every signed map has both signs
FLAGS = {  # relu=: a string such as "no" read as True, None and 0 as False
    "grad_cam": lambda v: gradcam_ref.grad_cam(SIGNED_A, SIGNED_G, relu=v),
    "grad_cam_plus_plus": lambda v: gradcam_ref.grad_cam_plus_plus(SIGNED_A, SIGNED_G, relu=v),
    "hires_cam": lambda v: gradcam_ref.hires_cam(SIGNED_A, SIGNED_G, relu=v),
    "xgrad_cam": lambda v: gradcam_ref.xgrad_cam(SIGNED_A, SIGNED_G, relu=v),
    "layer_cam": lambda v: gradcam_ref.layer_cam(SIGNED_A, SIGNED_G, relu=v),
    "eigen_cam": lambda v: gradcam_ref.eigen_cam(SIGNED_A, relu=v),
    "eigen_grad_cam": lambda v: gradcam_ref.eigen_grad_cam(SIGNED_A, SIGNED_G, relu=v),
    "fem": lambda v: gradcam_ref.fem(SIGNED_A, k=0.0, relu=v),
    "smooth_grad_cam_plus_plus": lambda v: gradcam_ref.smooth_grad_cam_plus_plus(SIGNED_A, SIGNED_G[None], relu=v),
}


@pytest.mark.parametrize("name", sorted(FLAGS))
@pytest.mark.parametrize("bad", ["no", None, 0, 1.0, np.array([True])], ids=["str", "None", "0", "1.0", "array"])
def test_relu_is_a_flag(name, bad):
    signed = FLAGS[name](False)
    assert signed.min() < 0 < signed.max()  # the ReLU matters here
    np.testing.assert_array_equal(FLAGS[name](True), np.maximum(signed, 0.0))
    np.testing.assert_array_equal(FLAGS[name](np.True_), FLAGS[name](True))  # NumPy's bools are flags
    with pytest.raises(TypeError) as error:
        FLAGS[name](bad)
    assert str(error.value) == f"relu must be True or False, got {' '.join(repr(bad).split())}"


CHOICES = {  # (function, option): a call with that option
    ("grad_cam_plus_plus", "variant"): lambda v: gradcam_ref.grad_cam_plus_plus(FEATURES, FEATURES, variant=v),
    ("eigen_cam", "sign"): lambda v: gradcam_ref.eigen_cam(FEATURES, sign=v),
    ("eigen_grad_cam", "sign"): lambda v: gradcam_ref.eigen_grad_cam(FEATURES, FEATURES, sign=v),
    ("fuse_maps", "rule"): lambda v: gradcam_ref.fuse_maps([MAPS], v),
    ("score_cam_masks", "variant"): lambda v: gradcam_ref.score_cam_masks(FEATURES, (4, 4), variant=v),
    ("ablated_activations", "value"): lambda v: gradcam_ref.ablated_activations(FEATURES, 0, [0], value=v),
    ("ablation_cam_weights", "denominator"): lambda v: gradcam_ref.ablation_cam_weights(np.ones(1), MAPS[0],
                                                                                       denominator=v),
}


@pytest.mark.parametrize("key", sorted(CHOICES), ids="-".join)
@pytest.mark.parametrize("bad", [np.array(["paper", "zero"]), None, 2, "unknown"], ids=["array", "None", "int", "name"])
def test_names_are_checked_by_type_before_membership(key, bad):
    """An array among the names asked for its truth value ('ambiguous'), None reached comparisons."""
    with pytest.raises(ValueError) as error:
        CHOICES[key](bad)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{key[1]} must be ")
    assert message.endswith(f"got {' '.join(repr(bad).split())}"), message


NUMBERS = {  # (function, option, least): a call with that option, and > 0 or >= 0
    ("layercam_scale", "gamma", "> 0"): lambda v: gradcam_ref.layercam_scale(MAPS, gamma=v),
    ("fuse_maps", "gamma", "> 0"): lambda v: gradcam_ref.fuse_maps([MAPS], "layercam", gamma=v),
    ("guided_image", "scale", "> 0"): lambda v: gradcam_ref.guided_image(FEATURES, scale=v),
    ("torchcam_smooth_weights", "eps", ">= 0"): lambda v: gradcam_ref.torchcam_smooth_weights(FEATURES, FEATURES[None],
                                                                                             eps=v),
    ("grad_cam_plus_plus", "eps", ">= 0"): lambda v: gradcam_ref.grad_cam_plus_plus(FEATURES, FEATURES, eps=v),
    ("xgrad_cam_weights", "eps", ">= 0"): lambda v: gradcam_ref.xgrad_cam_weights(FEATURES, FEATURES, eps=v),
}


@pytest.mark.parametrize("key", sorted(NUMBERS), ids=lambda key: "-".join(key[:2]))
@pytest.mark.parametrize("bad", [None, "2", True, np.array([1.0]), float("nan"), float("inf"), -1e-8, 0],
                         ids=["None", "str", "bool", "array", "nan", "inf", "negative", "zero"])
def test_numbers_are_finite_and_in_range(key, bad):
    """gamma=NaN gave NaN maps and gamma=0 zeros; eps=inf zero weights, eps=-1e-8 was taken."""
    name, option, least = key
    if type(bad) is int and bad == 0 and least == ">= 0":
        assert np.isfinite(NUMBERS[key](0)).all()
        return
    with pytest.raises((TypeError, ValueError)) as error:
        NUMBERS[key](bad)
    assert str(error.value) == f"{option} must be a finite number {least}, got {' '.join(repr(bad).split())}"
    assert isinstance(error.value, TypeError) == (not isinstance(bad, float | int) or isinstance(bad, bool))
