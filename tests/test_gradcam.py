"""Eq. 1 and Eq. 2, CAM and Grad-CAM++: hand-computed goldens, identities and bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import cam, grad_cam, grad_cam_plus_plus, neuron_importance
from gradcam_ref._arrays import all_finite
from gradcam_ref._gradcam import grad_cam_parts
from gradcam_ref.backends import numpy_backend

# ---------------------------------------------------------------------------------------------
# Goldens worked out by hand (in the comments), in the style of captum's layer tests.


def test_neuron_importance_is_the_spatial_mean():
    g = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[-4.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    # alpha_0 = (1 + 2 + 3 + 4) / 4 = 2.5 ; alpha_1 = -4 / 4 = -1
    np.testing.assert_array_equal(neuron_importance(g), [[2.5, -1.0]])


def test_grad_cam_golden_2d():
    a = np.array([[[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 1.0]]]])  # (1, 2, 2, 2)
    g = np.array([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [0.0, 0.0]]]])
    # alpha = [1, -0.5]; sum_k alpha_k A^k = [[1 - 0, 2 - .5], [0 - 1.5, 1 - .5]]
    signed = np.array([[[1.0, 1.5], [-1.5, 0.5]]])
    np.testing.assert_array_equal(grad_cam(a, g, relu=False), signed)
    np.testing.assert_array_equal(grad_cam(a, g), [[[1.0, 1.5], [0.0, 0.5]]])


def test_grad_cam_golden_1d_and_3d():
    # 1-D signal: K=1, Z=3, alpha = (3 + 0 + 0) / 3 = 1, map = A
    a1 = np.array([[[2.0, -1.0, 5.0]]])
    g1 = np.array([[[3.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(grad_cam(a1, g1), [[2.0, 0.0, 5.0]])
    # 3-D volume 2x2x2, K=1, gradients all 0.5: alpha = 0.5, map = A / 2
    a3 = np.arange(8.0).reshape(1, 1, 2, 2, 2)
    g3 = np.full_like(a3, 0.5)
    np.testing.assert_array_equal(grad_cam(a3, g3), a3[:, 0] / 2)


def test_grad_cam_multi_target_golden():
    a = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (N=1, K=2, 1, 2)
    g = np.array([[[[[2.0, 2.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[-1.0, 3.0]]]]])  # (1, T=2, 2, 1, 2)
    # target 0: alpha = [2, 0] -> map [2, 0]; target 1: alpha = [0, 1] -> map [0, 1]
    np.testing.assert_array_equal(grad_cam(a, g), [[[[2.0, 0.0]], [[0.0, 1.0]]]])


def test_cam_weights_shapes_golden():
    a = np.array([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])  # (2, 2, 1, 2)
    # (K,): w = [1, -1]: example 0 -> [1-3, 2-4] = [-2, -2]; example 1 -> [-1, 1]
    np.testing.assert_array_equal(cam(a, np.array([1.0, -1.0])), [[[-2.0, -2.0]], [[-1.0, 1.0]]])
    # (N, K): example 0 uses [0, 1] -> [3, 4]; example 1 uses [2, 0] -> [0, 2]
    np.testing.assert_array_equal(cam(a, np.array([[0.0, 1.0], [2.0, 0.0]])), [[[3.0, 4.0]], [[0.0, 2.0]]])
    # (N, T, K) with T = 1 equals (N, K) with a target axis
    w = np.array([[[0.0, 1.0]], [[2.0, 0.0]]])
    np.testing.assert_array_equal(cam(a, w), [[[[3.0, 4.0]]], [[[0.0, 2.0]]]])


def test_grad_cam_plus_plus_golden():
    a = np.array([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2): sum A = [4, 2]
    g = np.array([[[[1.0, -1.0]], [[0.5, 0.0]]]])
    # k=0: i=0: g=1: a = 1 / (2 + 4*1) = 1/6, ReLU(g)=1 -> 1/6; i=1: g=-1: a = 1 / (2 - 4) = -1/2,
    #      ReLU(g) = 0 -> 0. w_0 = 1/6.
    # k=1: i=0: g=.5: a = .25 / (.5 + 2*.125) = 1/3, ReLU(g) = .5 -> 1/6; i=1: g = 0 -> 0. w_1 = 1/6
    # map = 1/6 * [1 + 2, 3 + 0] = [0.5, 0.5]
    np.testing.assert_allclose(grad_cam_plus_plus(a, g), [[[0.5, 0.5]]], rtol=0, atol=1e-15)


def test_all_zero_gradients_give_an_all_zero_map():
    a = np.random.default_rng(0).random((2, 3, 4, 4))
    out = grad_cam(a, np.zeros_like(a))
    np.testing.assert_array_equal(out, np.zeros((2, 4, 4)))
    np.testing.assert_array_equal(grad_cam_plus_plus(a, np.zeros_like(a)), np.zeros((2, 4, 4)))


def test_numpy_results_are_float64_even_for_float32_and_int_input():
    a = np.ones((1, 2, 3, 3), dtype=np.float32)
    g = np.ones((1, 2, 3, 3), dtype=np.int32)
    assert grad_cam(a, g).dtype == np.float64
    assert neuron_importance(g).dtype == np.float64
    assert cam(a, [1, 2]).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Identities on random GAP networks from the NumPy oracle, for spatial ranks 1, 2 and 3.

gap_nets = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "rank": st.integers(1, 3),
        "depth": st.integers(1, 2),
        "width": st.integers(1, 5),
        "kernel": st.integers(1, 2),
        "size": st.integers(3, 6),
        "batch": st.integers(1, 3),
        "classes": st.integers(1, 4),
        "in_channels": st.integers(1, 3),
    }
)


def _oracle(p, head="gap"):
    rng = np.random.default_rng(p["seed"])
    model = numpy_backend.Oracle.random(
        rng,
        in_channels=p["in_channels"],
        widths=[p["width"]] * p["depth"],
        kernel_sizes=[p["kernel"]] * p["depth"],
        num_classes=p["classes"],
        spatial_rank=p["rank"],
        head=head,
        input_size=p["size"],
    )
    x = rng.standard_normal((p["batch"], p["in_channels"]) + (p["size"],) * p["rank"])
    return model, x


@given(gap_nets, st.data())
def test_grad_cam_is_relu_cam_over_z_on_gap_networks(p, data):
    model, x = _oracle(p)
    target = data.draw(st.integers(0, p["classes"] - 1))
    e = gradcam_ref.explain(model, x, target)
    z = math.prod(e.activations.shape[2:])
    class_weights = model.head_params[0][0][target]  # the linear layer's row for the class
    expected = np.maximum(cam(e.activations, class_weights), 0) / z
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(e.maps / scale, expected / scale, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.weights, np.broadcast_to(class_weights / z, e.weights.shape), atol=1e-15)
    # ... and after normalisation CAM and Grad-CAM are the same picture (1/Z is gone).
    np.testing.assert_allclose(
        gradcam_ref.normalize(e.maps), gradcam_ref.normalize(expected), rtol=0, atol=1e-12
    )


@given(gap_nets)
def test_relu_map_is_nonnegative_and_equals_positive_part(p):
    model, x = _oracle(p, head="gap-mlp")
    e = gradcam_ref.explain(model, x)
    signed = grad_cam(e.activations, e.gradients, relu=False)
    assert (e.maps >= 0).all()
    np.testing.assert_array_equal(e.maps, np.where(signed > 0, signed, 0.0))


arrays = st.fixed_dictionaries(
    {"seed": st.integers(0, 2**32 - 1), "n": st.integers(1, 3), "k": st.integers(1, 6),
     "spatial": st.lists(st.integers(1, 5), min_size=1, max_size=3)}
)


def _random_pair(p):
    rng = np.random.default_rng(p["seed"])
    shape = (p["n"], p["k"], *p["spatial"])
    return rng.standard_normal(shape), rng.standard_normal(shape), rng


@given(arrays, st.floats(-3, 3), st.floats(-3, 3))
def test_alpha_is_linear_in_the_gradients(p, s, t):
    _, g, rng = _random_pair(p)
    h = rng.standard_normal(g.shape)
    np.testing.assert_allclose(
        neuron_importance(s * g + t * h),
        s * neuron_importance(g) + t * neuron_importance(h),
        rtol=1e-12, atol=1e-12,
    )


@given(arrays)
def test_permuting_channels_changes_nothing(p):
    a, g, rng = _random_pair(p)
    perm = rng.permutation(p["k"])
    np.testing.assert_allclose(grad_cam(a[:, perm], g[:, perm]), grad_cam(a, g), rtol=1e-12, atol=1e-14)


@given(arrays, st.floats(1e-3, 1e3))
def test_scaling_activations_scales_the_map(p, s):
    a, g, _ = _random_pair(p)
    np.testing.assert_allclose(grad_cam(s * a, g), s * grad_cam(a, g), rtol=1e-12, atol=1e-12 * s)


@given(arrays, st.integers(1, 3))
def test_multi_target_equals_single_targets(p, t):
    a, _, rng = _random_pair(p)
    g = rng.standard_normal((p["n"], t, p["k"], *p["spatial"]))
    multi = grad_cam(a, g)
    for i in range(t):
        np.testing.assert_allclose(multi[:, i], grad_cam(a, g[:, i]), rtol=1e-13, atol=1e-14)


@given(arrays)
def test_grad_cam_equals_the_literal_equations(p):
    """The matmul formulation against Eq. 1 and Eq. 2 written out with explicit loops."""
    a, g, _ = _random_pair(p)
    n, k = a.shape[:2]
    z = math.prod(a.shape[2:])
    expected = np.zeros((n, *a.shape[2:]))
    for i in range(n):
        for j in range(k):
            alpha = g[i, j].sum() / z
            expected[i] += alpha * a[i, j]
    np.testing.assert_allclose(grad_cam(a, g), np.maximum(expected, 0), rtol=1e-12, atol=1e-13)


def test_counterfactual_map_is_the_grad_cam_of_negated_gradients():
    a, g, _ = _random_pair({"seed": 3, "n": 2, "k": 4, "spatial": [3, 3]})
    np.testing.assert_array_equal(grad_cam(a, -g), np.maximum(-grad_cam(a, g, relu=False), 0))


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the argument and show the expected and the actual shape.


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: grad_cam(np.ones((2, 3)), np.ones((2, 3))), ValueError,
         r"activations must have shape \(N, K, \*spatial\).*got shape \(2, 3\)"),
        (lambda: neuron_importance(np.ones(4)), ValueError, r"gradients must have shape.*got shape \(4,\)"),
        (lambda: grad_cam(np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 5))), ValueError,
         r"gradients must have the shape of activations \(2, 3, 4, 4\).*got shape \(2, 3, 4, 5\)"),
        (lambda: grad_cam(np.ones((0, 3, 4)), np.ones((0, 3, 4))), ValueError,
         r"activations must not be empty.*\(0, 3, 4\)"),
        (lambda: grad_cam(np.ones((1, 2, 3)), np.array([[["a", "b", "c"]] * 2])), TypeError,
         r"gradients must have a real numeric dtype"),
        (lambda: grad_cam(np.ones((1, 2, 3), dtype=bool), np.ones((1, 2, 3))), TypeError,
         r"activations must have a real numeric dtype, got bool"),
        (lambda: grad_cam(np.ones((1, 2, 3)), np.full((1, 2, 3), np.nan)), ValueError,
         r"gradients contains NaN or Inf \(6 of 6 values\)"),
        (lambda: grad_cam(np.array([[[1.0, np.inf, 0.0]]]), np.ones((1, 1, 3))), ValueError,
         r"activations contains NaN or Inf \(1 of 3 values\)"),
        (lambda: cam(np.ones((2, 3, 4)), np.ones(4)), ValueError,
         r"class_weights must have shape \(K,\) = \(3,\).*got shape \(4,\)"),
        (lambda: cam(np.ones((2, 3, 4)), np.ones((3, 3))), ValueError,
         r"\(N, K\) = \(2, 3\).*got shape \(3, 3\)"),
        (lambda: grad_cam_plus_plus(np.ones((1, 2, 3)), np.ones((1, 3, 3))), ValueError,
         r"gradients must have the shape of activations"),
        (lambda: grad_cam(np.ones((1, 2, 3)), object()), TypeError, r"gradients must have a real numeric"),
    ],
)
def test_bad_input_gives_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_overflow_is_reported_as_such():
    a = np.full((1, 2, 2), 1e300)
    g = np.full((1, 2, 2), 1e300)
    with pytest.raises(ValueError, match="overflowed"):
        grad_cam(a, g)


def test_finite_results_whose_sum_overflows_are_not_an_error():
    # The finiteness check adds up the map once (finite maps prove finite alpha); here the sum
    # of alpha would overflow, and the map's sum must not be mistaken for a NaN or Inf although
    # every value is finite, so the values themselves must settle it.
    a = np.array([[[[1e-300]], [[3e-300]]]])  # (1, 2, 1, 1): Z = 1
    g = np.full((1, 2, 1, 1), 1e308)  # alpha = [1e308, 1e308]: finite, their sum is not
    # map = 1e308 * 1e-300 + 1e308 * 3e-300 = 4e8
    explanation = gradcam_ref.Explanation.from_capture(gradcam_ref.Capture(a, g, np.zeros((1, 1)), None))
    np.testing.assert_array_equal(explanation.weights, [[1e308, 1e308]])
    np.testing.assert_allclose(explanation.maps, [[[4e8]]], rtol=1e-12)
    np.testing.assert_allclose(grad_cam(a, g, relu=False), [[[4e8]]], rtol=1e-12)


_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, np.finfo(np.float32).max]),
)


@given(st.lists(st.lists(_values, min_size=0, max_size=6), min_size=1, max_size=3),
       st.sampled_from(["numpy", "torch32", "torch64", "torch64 with a graph"]))
def test_all_finite_says_whether_every_value_is_finite(values, library):
    import warnings

    import torch  # part of `make test`: never skipped
    expected = all(math.isfinite(v) for vs in values for v in vs)
    if library == "numpy":
        arrays = [np.asarray(vs, dtype=np.float64) for vs in values]
    else:
        dtype = torch.float32 if library == "torch32" else torch.float64
        arrays = [torch.tensor(vs, dtype=dtype) for vs in values]
        expected = all(bool(torch.isfinite(x).all()) for x in arrays)  # float32 rounds 1e308 to inf
        if library.endswith("graph"):  # read through isfinite: float() would warn about the graph
            arrays = [x.requires_grad_(True) * 1.0 for x in arrays]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all_finite(*arrays) is expected


@given(st.lists(_values, min_size=4, max_size=4), st.lists(_values, min_size=4, max_size=4),
       st.sampled_from([(1, 2, 2), (2, 2, 1), (1, 4, 1)]))
def test_grad_cam_parts_never_returns_a_non_finite_weight(a_values, g_values, shape):
    """The one finiteness check reads the map only: a NaN or Inf weight must still be refused
    (it makes every value of its map non-finite); with finite inputs of moderate size the weights
    are the spatial means."""
    a = np.asarray(a_values, dtype=np.float64).reshape(1, *shape)
    g = np.asarray(g_values, dtype=np.float64).reshape(1, *shape)
    moderate = bool(np.all(np.abs(np.concatenate([a.ravel(), g.ravel()])) < 1e150))
    try:
        alpha, maps = grad_cam_parts(a, g)
    except ValueError as error:
        assert not moderate, error  # NaN/Inf inputs, or an overflow of huge values
        assert "NaN" in str(error) or "Inf" in str(error) or "overflow" in str(error)
        return
    assert np.isfinite(alpha).all() and np.isfinite(maps).all()
    if moderate:
        np.testing.assert_allclose(alpha, g.mean(axis=(2, 3)), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# torch and JAX arrays in, the same kind out: no host copy, autograd kept.


def test_torch_tensors_stay_torch_and_keep_autograd():
    import torch  # part of `make test`: never skipped
    a = torch.rand(2, 3, 4, 4, dtype=torch.float32, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float32)
    out = grad_cam(a, g)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == a.device
    np.testing.assert_allclose(out.detach().numpy(), grad_cam(a.detach().numpy(), g.numpy()), rtol=1e-5, atol=1e-6)
    # d(sum of the signed map)/dA^k = alpha_k everywhere: autograd flows back through the core.
    grad_cam(a, g, relu=False).sum().backward()
    alpha = g.mean(dim=(2, 3))
    torch.testing.assert_close(a.grad, alpha[:, :, None, None].expand_as(a))
    for f in (gradcam_ref.upsample, gradcam_ref.normalize):
        assert isinstance(f(out, (8, 8)) if f is gradcam_ref.upsample else f(out), torch.Tensor)


def test_jax_arrays_stay_jax_and_trace_under_jit():
    import jax  # part of `make test`: never skipped
    jnp = jax.numpy
    a = jnp.asarray(np.random.default_rng(0).random((2, 3, 4, 4)), dtype=jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 4)), dtype=jnp.float32)
    out = grad_cam(a, g)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    jitted = jax.jit(lambda a, g: gradcam_ref.normalize(gradcam_ref.upsample(grad_cam(a, g), (8, 8))))(a, g)
    eager = gradcam_ref.normalize(gradcam_ref.upsample(grad_cam(np.asarray(a), np.asarray(g)), (8, 8)))
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5)
    # differentiable: d(sum of the signed map)/dA = alpha, broadcast
    da = jax.grad(lambda a: grad_cam(a, g, relu=False).sum())(a)
    np.testing.assert_allclose(np.asarray(da), np.broadcast_to(np.asarray(g).mean(axis=(2, 3))[..., None, None], a.shape), rtol=1e-5)


def test_mixed_libraries_are_refused():
    import torch  # part of `make test`: never skipped
    with pytest.raises(TypeError, match="arrays must all come from one library"):
        grad_cam(np.ones((1, 2, 3)), torch.ones(1, 2, 3))
