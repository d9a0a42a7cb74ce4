"""upsample and normalize: goldens, torch and JAX as independent references, no NaN ever."""

import numpy as np
import pytest
import torch  # part of `make test`: the independent reference for the resize kernel
from hypothesis import given
from hypothesis import strategies as st

from gradcam_ref import normalize, upsample
from tests.strategies import edgy_arrays, map_shapes, resize_cases

# ---------------------------------------------------------------------------------------------
# upsample


def test_upsample_half_pixel_golden():
    np.testing.assert_array_equal(upsample(np.array([[0.0, 1.0]]), (4,)), [[0.0, 0.25, 0.75, 1.0]])
    # 2-D: bilinear is the product of the 1-D rules: [[0, 1], [2, 3]] -> 4x4
    out = upsample(np.array([[[0.0, 1.0], [2.0, 3.0]]]), 4)
    row = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_array_equal(out[0], row[None, :] + 2 * row[:, None])


def test_upsample_to_the_same_size_is_the_identity():
    x = np.random.default_rng(0).random((2, 3, 5))
    np.testing.assert_array_equal(upsample(x, (3, 5)), x)


def test_upsample_multi_target_maps_keep_their_leading_axes():
    x = np.random.default_rng(1).random((2, 3, 4, 4))  # (N, T, h, w)
    out = upsample(x, (8, 8))
    assert out.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(out[1, 2], upsample(x[1, 2][None], (8, 8))[0])


@given(resize_cases)
def test_upsample_equals_torch_interpolate_align_corners_false(p):
    rank = len(p["shape_in"])
    out_size = tuple(p["shape_out"][:rank])
    x = np.random.default_rng(p["seed"]).standard_normal((p["n"], *p["shape_in"]))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[rank]
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=out_size, mode=mode, align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(upsample(x, out_size), ref, rtol=0, atol=1e-14)


@given(resize_cases)
def test_upsampling_equals_jax_image_resize(p):
    """jax.image.resize("linear") uses half-pixel centres too (and no antialias when growing)."""
    import jax  # part of `make test`

    rank = len(p["shape_in"])
    out_size = tuple(max(a, b) for a, b in zip(p["shape_in"], p["shape_out"][:rank], strict=True))  # grow only
    x = np.random.default_rng(p["seed"]).standard_normal((p["n"], *p["shape_in"])).astype(np.float32)
    ref = np.asarray(jax.image.resize(x, (p["n"], *out_size), method="linear"))
    out = upsample(x, out_size)
    assert out.shape == ref.shape == (p["n"], *out_size)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@given(map_shapes(max_rank=2, max_side=4).flatmap(edgy_arrays), st.lists(st.integers(1, 9), min_size=2, max_size=2))
def test_upsample_stays_inside_each_maps_range_even_at_the_largest_floats(x, size):
    """Interpolation between two values lies between them: exactly, also for +-1.8e308 and subnormals."""
    out = upsample(x, tuple(size[: x.ndim - 1]))
    for n in range(x.shape[0]):
        assert x[n].min() <= out[n].min() and out[n].max() <= x[n].max()


@given(resize_cases)
def test_upsample_stays_inside_the_input_range(p):
    rank = len(p["shape_in"])
    x = np.random.default_rng(p["seed"]).standard_normal((p["n"], *p["shape_in"]))
    out = upsample(x, tuple(p["shape_out"][:rank]))
    assert out.min() >= x.min() - 1e-15 and out.max() <= x.max() + 1e-15


def test_upsample_keeps_torch_float32_on_its_device():
    x = torch.rand(2, 7, 7)
    out = upsample(x, (224, 224))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == x.device
    ref = torch.nn.functional.interpolate(x[:, None], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("maps", "size", "message"),
    [
        (np.ones((2, 3)), (4, 4), r"maps must have a batch axis before the 2 spatial axes.*got shape \(2, 3\)"),
        (np.ones((2, 3)), (0,), r"size must be a positive int"),
        (np.ones((2, 3)), (2.5,), r"size must be a positive int"),
        (np.ones((0, 3)), (4,), r"maps must not be empty"),
        (np.array([[np.nan, 1.0]]), (4,), r"maps contains NaN or Inf"),
        (np.ones((1, 2, 3)), np.array(0), r"size must be a positive int or 2 positive ints .*got array\(0\)$"),
        (np.ones((1, 2, 3)), "4", r"size must be a positive int or 2 positive ints .*got '4'$"),
        (np.ones((1, 3)), "4", r"size must be a positive int or 1 positive int \(one per spatial axis\), got '4'$"),
    ],
)
def test_upsample_bad_input(maps, size, message):
    with pytest.raises(ValueError, match=message):
        upsample(maps, size)


def test_upsample_takes_a_zero_dimensional_int_array_as_the_int_it_holds():
    x = np.random.default_rng(3).random((2, 3, 5))
    np.testing.assert_array_equal(upsample(x, np.array(7)), upsample(x, 7))  # was "len() of unsized object"


# ---------------------------------------------------------------------------------------------
# normalize


def test_normalize_minmax_and_max_goldens():
    x = np.array([[[1.0, 3.0], [2.0, 5.0]], [[-2.0, 0.0], [2.0, 0.0]]])
    np.testing.assert_array_equal(normalize(x), [[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.5], [1.0, 0.5]]])
    np.testing.assert_array_equal(normalize(x, "max"), [[[0.2, 0.6], [0.4, 1.0]], [[-1.0, 0.0], [1.0, 0.0]]])


def test_a_flat_map_becomes_zeros_never_nan():
    x = np.stack([np.zeros((3, 3)), np.full((3, 3), 7.0), np.arange(9.0).reshape(3, 3)])
    for method in ("minmax", "max"):
        out = normalize(x, method)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(normalize(x)[1], 0.0)
    np.testing.assert_array_equal(normalize(x, "max")[1], 1.0)  # 7 / max|7| = 1: not flat for "max"


@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-300, 1.0, 1e300, 1.7e308]))
def test_normalize_is_finite_and_in_range_at_any_scale(seed, scale):
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, (3, 4, 4)) * scale
    out = normalize(x)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0)
    out = normalize(x, "max")
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0


@given(st.integers(0, 2**32 - 1), st.sampled_from(["float16", "float32", "float64"]),
       st.sampled_from([0.3, 0.6, 0.99]), st.booleans())
def test_normalize_huge_spans_alike_in_every_library(seed, dtype, fraction, signed):
    """Spans past 1 / smallest normal: XLA divides as x * (1 / span), and that reciprocal is subnormal
    (flushed to 0: all-zero maps before the fix). torch keeps the dtype and gives the plain quotient
    wherever the span fits the dtype; JAX gives torch's numbers."""
    import jax.numpy as jnp

    top = float(np.finfo(dtype).max) * fraction
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-1.0 if signed else 0.0, 1.0, (2, 3, 5)) * top).astype(dtype)
    x[:, 0, 0] = top  # the span reaches the top (and with signed values may overflow)
    low, high = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        span = high - low
        plain = {"minmax": (x - low) / span, "max": x / np.abs(x).max(axis=(1, 2), keepdims=True)}
    fits = np.isfinite(span)[:, 0, 0]
    plain["minmax"] = plain["minmax"][fits]
    for method in ("minmax", "max"):
        reference = normalize(torch.from_numpy(x), method).numpy()
        assert reference.dtype == x.dtype and np.isfinite(reference).all() and reference.max() == 1.0
        np.testing.assert_array_equal(reference[fits] if method == "minmax" else reference, plain[method])
        if dtype != "float64":  # JAX holds float64 only with jax_enable_x64
            np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(x), method)), reference,
                                       rtol=float(np.finfo(dtype).eps), atol=0)


def test_normalize_spans_the_given_axes_only():
    x = np.random.default_rng(2).random((2, 3, 4, 4))  # (N, T, h, w)
    out = normalize(x, axis=(-2, -1))
    for n in range(2):
        for t in range(3):
            np.testing.assert_allclose(out[n, t], normalize(x[n, t][None])[0], rtol=1e-15)


def test_normalize_takes_axes_as_a_numpy_array():
    x = np.arange(12.0).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(normalize(x, axis=np.array([2, 3])), normalize(x, axis=(2, 3)))
    np.testing.assert_array_equal(normalize(x, axis=np.array([2, 3]))[0, 1], np.arange(6.0).reshape(2, 3) / 5)


def test_normalize_keeps_torch():
    x = torch.rand(2, 5, 5, dtype=torch.float64)
    out = normalize(x)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), normalize(x.numpy()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"maps": np.ones((2, 3)), "method": "zscore"}, ValueError, r"method must be one of \('minmax', 'max'\)"),
        ({"maps": np.ones(3)}, ValueError, r"maps must have shape \(N, \*spatial\).*\(3,\)"),
        ({"maps": np.array([[1.0, np.nan]])}, ValueError, r"maps contains NaN or Inf \(1 of 2 values\)"),
        ({"maps": np.array([[1.0, np.inf]]), "method": "max"}, ValueError, r"maps contains NaN or Inf"),
        ({"maps": np.ones((2, 3)), "axis": 0}, ValueError, r"axis must name spatial axes"),
        ({"maps": np.ones((2, 3)), "axis": 5}, ValueError, r"axis must name spatial axes"),
        # NumPy's "'float' object is not iterable", "duplicate value in 'axis'", "truth value ... ambiguous"
        ({"maps": np.ones((2, 3, 3)), "axis": 1.5}, TypeError, r"axis must be an int or a sequence of ints, got 1.5$"),
        ({"maps": np.ones((2, 3, 3)), "axis": [1, 1]}, ValueError,
         r"axis must name distinct spatial axes of maps, got \[1, 1\]"),
        ({"maps": np.ones((2, 3, 3)), "axis": (1, -2)}, ValueError,
         r"axis must name distinct spatial axes of maps, got \(1, -2\)"),
        ({"maps": np.ones((2, 3)), "method": np.array(["minmax", "max"])}, ValueError,
         r"method must be one of \('minmax', 'max'\), got array\(\['minmax', 'max'\], dtype='<U6'\)$"),
    ],
)
def test_normalize_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        normalize(**kwargs)
    assert "\n" not in str(raised.value)
