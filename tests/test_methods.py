"""The CAM family in the core: hand goldens, identities that must hold, options, errors.

Backends (NumPy oracle vs torch vs JAX) and the peers: tests/backends/test_methods_backends.py.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradcam_ref
from gradcam_ref._methods import method_fields
from gradcam_ref.backends.numpy_backend import Oracle

# --- hand-computed goldens on a tiny layer: N=1, K=2, 2x2 ---------------------------------------

A = np.array([[[[1.0, 2.0], [0.0, 1.0]],
               [[0.0, 3.0], [1.0, 0.0]]]])
G = np.array([[[[1.0, -1.0], [2.0, 0.0]],
               [[-2.0, 1.0], [0.0, 4.0]]]])


def test_hirescam_golden():
    # sum_k G^k A^k: [1*1 + 0*-2, 2*-1 + 3*1; 0*2 + 1*0, 1*0 + 0*4] = [[1, 1], [0, 0]]
    np.testing.assert_array_equal(gradcam_ref.hires_cam(A, G, relu=False), [[[1.0, 1.0], [0.0, 0.0]]])


def test_xgrad_cam_golden():
    # channel 0: sum GA = 1 - 2 + 0 + 0 = -1, sum A = 4 -> -1/4; channel 1: 0 + 3 + 0 + 0 = 3, sum A = 4 -> 3/4
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam_weights(A, G), [[-0.25, 0.75]])
    # map: -1/4 A^0 + 3/4 A^1 = [[-0.25, 1.75], [0.75, -0.25]] -> ReLU
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam(A, G), [[[0.0, 1.75], [0.75, 0.0]]])
    np.testing.assert_allclose(gradcam_ref.xgrad_cam_weights(A, G, eps=1e-7), [[-1 / 4.0000001, 3 / 4.0000001]], rtol=1e-15)


def test_xgrad_cam_zero_sum_channel_gets_no_weight_not_nan():
    a = np.array([[[[0.0, 0.0]], [[1.0, -1.0]], [[2.0, 0.0]]]])  # channel 0 zero, channel 1 sums to 0
    g = np.array([[[[5.0, 5.0]], [[1.0, 2.0]], [[1.0, 1.0]]]])
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam_weights(a, g), [[0.0, 0.0, 1.0]])
    # with pytorch-grad-cam's eps the zero-sum channel gets sum(GA) / eps = -1e7
    np.testing.assert_allclose(gradcam_ref.xgrad_cam_weights(a, g, eps=1e-7), [[0.0, -1e7, 2 / (2 + 1e-7)]], rtol=1e-12)


def test_layer_cam_golden():
    # ReLU(G) * A summed: [1*1 + 0, 0 + 1*3; 2*0 + 0, 0 + 4*0] = [[1, 3], [0, 0]]
    np.testing.assert_array_equal(gradcam_ref.layer_cam(A, G), [[[1.0, 3.0], [0.0, 0.0]]])


def test_grad_cam_plus_plus_through_the_dispatch_golden_and_eps():
    # grad_cam_plus_plus's own doctest: a = [1, 1], g = [1, 0]: a_ij = [1/4, 0], w = 1/4
    a, g = np.array([[[[1.0, 1.0]]]]), np.array([[[[1.0, 0.0]]]])
    weights, signed = method_fields("grad-cam++", a, g)
    np.testing.assert_array_equal(weights, [[0.25]])
    np.testing.assert_array_equal(signed, [[[0.25, 0.25]]])
    weights, _ = method_fields("grad-cam++", a, g, eps=1e-6)  # pytorch-grad-cam's: 1 / (4 + 1e-6)
    np.testing.assert_allclose(weights, [[1 / (4 + 1e-6)]], rtol=1e-15)


def test_eigen_cam_golden_rank_one():
    # O (Z x K) = [[3, 4], [0, 0], [6, 8]] = u v^T with v = [3, 4] / 5: the projection O v = [5, 0, 10]
    a = np.array([[[[3.0, 0.0, 6.0]], [[4.0, 0.0, 8.0]]]])
    np.testing.assert_allclose(gradcam_ref.eigen_cam(a), [[[5.0, 0.0, 10.0]]], rtol=1e-14)
    # centred: O - mean = [[0, 0], [-3, -4], [3, 4]] -> projections [0, -5, 5]; orientation: max |.| tie,
    # sum 0, first non-zero (-5) made positive -> [0, 5, -5]
    np.testing.assert_allclose(gradcam_ref.eigen_cam(a, centre=True, relu=False), [[[0.0, 5.0, -5.0]]], atol=1e-14)


def test_eigen_grad_cam_is_eigen_cam_of_the_product():
    np.testing.assert_allclose(gradcam_ref.eigen_grad_cam(A, G), gradcam_ref.eigen_cam(A * G), rtol=1e-14)


def test_smooth_grad_cam_plus_plus_golden():
    # two samples g = [1, 0] and g = [3, 0] on a = [1, 1] (sum A = 2): D1 = [2, 0], D2 = [5, 0],
    # D3 = [14, 0]: a_11 = 5 / (10 + 28) = 5/38, w = 5/38 * 2 = 5/19
    a = np.array([[[[1.0, 1.0]]]])
    g = np.array([[[[[1.0, 0.0]]]], [[[[3.0, 0.0]]]]])
    np.testing.assert_allclose(gradcam_ref.smooth_grad_cam_plus_plus(a, g), [[[5 / 19, 5 / 19]]], rtol=1e-15)


def test_score_cam_masks_golden_per_variant():
    a = np.array([[[[0.0, 2.0]]]])  # N=1, K=1, 1x2 -> 1x4
    paper = gradcam_ref.score_cam_masks(a, (1, 4))
    np.testing.assert_allclose(paper, [[[[0.0, 0.25, 0.75, 1.0]]]])
    corner = gradcam_ref.score_cam_masks(a, (1, 4), variant="pytorch-grad-cam")  # [0, 2/3, 4/3, 2] / (2 + 1e-8)
    np.testing.assert_allclose(corner, np.array([[[[0.0, 2 / 3, 4 / 3, 2.0]]]]) / (2 + 1e-8), rtol=1e-15)
    before = gradcam_ref.score_cam_masks(a, (1, 4), variant="torchcam")  # [0, 2 / (2 + 1e-8)] upsampled
    np.testing.assert_allclose(before, np.array([[[[0.0, 0.25, 0.75, 1.0]]]]) * (2 / (2 + 1e-8)), rtol=1e-15)
    flat = gradcam_ref.score_cam_masks(np.ones((1, 1, 1, 2)), (1, 4))
    np.testing.assert_array_equal(flat, np.zeros((1, 1, 1, 4)))  # never NaN


def test_score_cam_weights_golden_and_baseline_invariance():
    np.testing.assert_allclose(gradcam_ref.score_cam_weights(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]], rtol=1e-15)
    s = np.array([[1.0, -2.0, 3.0], [-700.0, -710.0, -705.0]])  # huge negative scores: no underflow to 0/0
    w = gradcam_ref.score_cam_weights(s)
    np.testing.assert_allclose(w, gradcam_ref.score_cam_weights(s, baseline=np.array([5.0, -700.0])), rtol=1e-14)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-15)


def test_ablation_golden_and_the_sign_of_the_score():
    np.testing.assert_array_equal(gradcam_ref.ablation_cam_weights(np.array([2.0]), np.array([[1.0, 3.0]])), [[0.5, -0.5]])
    # y < 0: the paper's formula flips the signs; "abs" keeps "a drop is evidence"
    np.testing.assert_array_equal(gradcam_ref.ablation_cam_weights(np.array([-2.0]), np.array([[-3.0, -1.0]])), [[-0.5, 0.5]])
    np.testing.assert_array_equal(
        gradcam_ref.ablation_cam_weights(np.array([-2.0]), np.array([[-3.0, -1.0]]), denominator="abs"), [[0.5, -0.5]])
    with pytest.raises(ValueError, match="exactly 0 for 1 example"):
        gradcam_ref.ablation_cam_weights(np.array([0.0, 1.0]), np.array([[1.0], [0.0]]))


def test_ablated_activations_values():
    rows = gradcam_ref.ablated_activations(A, 0, [1, 0])
    np.testing.assert_array_equal(rows[0, 0], A[0, 0])
    np.testing.assert_array_equal(rows[0, 1], 0.0)
    np.testing.assert_array_equal(rows[1, 0], 0.0)
    np.testing.assert_array_equal(rows[1, 1], A[0, 1])
    # pytorch-grad-cam: min is -1, not 0: channel c is set to the float32 sequence min - (1 + c % chunk) * 1e7
    signed = A - 1.0
    rows = gradcam_ref.ablated_activations(signed, 0, [0, 1, 2], value="pytorch-grad-cam", chunk=2)  # K = 2: 2 -> 0
    first = np.float32(np.float32(-1.0) - np.float32(1e7))
    second = np.float32(first - np.float32(1e7))
    assert rows[0, 0, 0, 0] == first and rows[1, 1, 0, 0] == second and rows[2, 0, 0, 0] == signed[0, 0, 0, 0]
    zero_min = gradcam_ref.ablated_activations(A, 0, [1], value="pytorch-grad-cam")  # min 0: plain zeros
    np.testing.assert_array_equal(zero_min, gradcam_ref.ablated_activations(A, 0, [1]))


def test_layercam_scale_and_fusion_goldens():
    m = np.array([[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(gradcam_ref.layercam_scale(m), np.tanh(2 * m / 2))
    np.testing.assert_array_equal(gradcam_ref.layercam_scale(np.zeros((1, 3))), np.zeros((1, 3)))  # max 0 stays 0
    small, big = np.array([[0.0, 1.0]]), np.array([[2.0, 2.0, 0.0, 0.0]])  # small upsampled: [0, .25, .75, 1]
    np.testing.assert_allclose(gradcam_ref.fuse_maps([small, big], "mean"), [[1.0, 1.125, 0.375, 0.5]])
    np.testing.assert_allclose(gradcam_ref.fuse_maps([small, big], "max"), [[2.0, 2.0, 0.75, 1.0]])
    # scaled at each map's own resolution, then resized (torchcam's order): tanh(2) [0, .25, .75, 1]
    expected = np.maximum(np.tanh(2.0) * np.array([0.0, 0.25, 0.75, 1.0]), np.tanh(2 * np.array([1.0, 1.0, 0, 0])))
    np.testing.assert_allclose(gradcam_ref.fuse_maps([small, big], "layercam"), [expected])
    with pytest.raises(ValueError, match="rule must be one of"):
        gradcam_ref.fuse_maps([small], "median")


# --- identities (hypothesis) -------------------------------------------------------------------

values = st.one_of(st.just(0.0), st.floats(-1e3, 1e3), st.sampled_from([1e-300, -1e-300, 1e200]))


@st.composite
def gap_layers(draw):
    """Activations >= 0 (a ReLU layer, exact zeros included) and gradients constant over space."""
    n, k, h, w, t = (draw(st.integers(1, 3)) for _ in range(5))
    a = draw(hnp.arrays(np.float64, (n, k, h, w), elements=st.one_of(st.just(0.0), st.floats(0, 1e3))))
    alpha = draw(hnp.arrays(np.float64, (n, t, k), elements=st.floats(-10, 10)))
    return a, np.broadcast_to(alpha[..., None, None], (n, t, k, h, w)).copy()


@settings(max_examples=60, deadline=None)
@given(gap_layers())
def test_hirescam_and_xgrad_cam_equal_grad_cam_when_the_gradient_is_constant_over_space(layer):
    a, g = layer
    expected = gradcam_ref.grad_cam(a, g)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(gradcam_ref.hires_cam(a, g), expected, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(gradcam_ref.xgrad_cam(a, g), expected, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(gradcam_ref.hires_cam(a, g[:, 0]), gradcam_ref.grad_cam(a, g[:, 0]), rtol=0, atol=1e-12 * scale)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_multi_target_layout_is_each_target_alone(data):
    n, t, k, z = (data.draw(st.integers(1, 3)) for _ in range(4))
    a = data.draw(hnp.arrays(np.float64, (n, k, z), elements=values))
    g = data.draw(hnp.arrays(np.float64, (n, t, k, z), elements=st.floats(-10, 10)))
    for method in ("grad-cam++", "hirescam", "xgrad-cam", "layercam", "eigen-cam", "eigen-grad-cam"):
        try:
            multi = method_fields(method, a, g).signed
        except ValueError as error:  # overflow of the products: refused by name, never NaN
            assert "overflowed" in str(error) or "NaN or Inf" in str(error)
            continue
        assert multi.shape == (n, t, z)
        scale = max(np.abs(multi).max(), 1e-300)
        for i in range(t):  # batched SVDs and matmuls may differ from single ones in the last bits
            np.testing.assert_allclose(multi[:, i], method_fields(method, a, g[:, i]).signed, rtol=0,
                                       atol=1e-12 * scale)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_eigen_cam_is_invariant_to_channel_order_and_positive_scale(data):
    n, k, h, w = (data.draw(st.integers(1, 3)) for _ in range(4))
    a = data.draw(hnp.arrays(np.float64, (n, k, h, w), elements=st.one_of(st.just(0.0), st.floats(-100, 100))))
    perm = data.draw(st.permutations(range(k)))
    c = data.draw(st.floats(1e-3, 1e3))
    for centre in (False, True):
        # the first principal component is defined only when the top singular value is simple
        m = a.reshape(n, k, h * w).transpose(0, 2, 1)
        m = m - m.mean(axis=1, keepdims=True) if centre else m
        sv = np.linalg.svd(m, compute_uv=False)
        assume(all(len(v) < 2 or v[0] - v[1] > 1e-6 * v[0] for v in sv))
        base = gradcam_ref.eigen_cam(a, centre=centre, relu=False)
        scale = max(np.abs(base).max(), np.abs(a).max(), 1e-300)  # rounding is relative to A
        # permuting channels or scaling A may flip the SVD's sign; the fixed orientation may not move
        np.testing.assert_allclose(gradcam_ref.eigen_cam(a[:, list(perm)], centre=centre, relu=False), base,
                                   rtol=0, atol=1e-9 * scale)
        np.testing.assert_allclose(gradcam_ref.eigen_cam(c * a, centre=centre, relu=False), c * base, rtol=0,
                                   atol=1e-9 * c * scale)
        raw = gradcam_ref.eigen_cam(a, centre=centre, sign="svd", relu=False)
        for i in range(n):  # the raw projection is +-the fixed one
            assert np.allclose(raw[i], base[i], atol=1e-9 * scale) or np.allclose(raw[i], -base[i], atol=1e-9 * scale)
        top, bottom = base.reshape(n, -1).max(axis=1), base.reshape(n, -1).min(axis=1)
        assert np.all(top >= -bottom - 1e-9 * scale)  # the largest magnitude is positive


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_smooth_with_identical_samples_is_grad_cam_plus_plus_and_layercam_with_positive_g_is_hirescam(data):
    n, k, z, s = (data.draw(st.integers(1, 3)) for _ in range(4))
    a = data.draw(hnp.arrays(np.float64, (n, k, z), elements=st.floats(0, 100)))
    g = data.draw(hnp.arrays(np.float64, (n, k, z), elements=st.one_of(st.just(0.0), st.floats(-10, 10))))
    expected = gradcam_ref.grad_cam_plus_plus(a, g)
    np.testing.assert_allclose(gradcam_ref.smooth_grad_cam_plus_plus(a, np.stack([g] * s)), expected,
                               rtol=1e-12, atol=1e-12 * max(np.abs(expected).max(), 1e-300))
    np.testing.assert_array_equal(gradcam_ref.layer_cam(a, np.abs(g)), gradcam_ref.hires_cam(a, np.abs(g)))


# --- the oracle: Ablation-CAM on a GAP head has a closed form -----------------------------------


def test_ablation_cam_on_a_gap_head_is_the_class_weight_times_the_channel_mean():
    # y = W GAP(A) + b, so zeroing channel k lowers y^c by W_ck mean(A^k): w_k = W_ck mean(A^k) / y^c
    rng = np.random.default_rng(3)
    oracle = Oracle.random(rng, in_channels=2, widths=[3, 4], kernel_sizes=[3, 2], num_classes=5)
    x = rng.standard_normal((3, 2, 9, 8))
    targets = [0, 4, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        e = gradcam_ref.explain(oracle, x, targets, method="ablation-cam", batch_size=3)
    (w, _), = oracle.head_params
    y = e.scores[np.arange(3), targets]
    expected = w[targets] * e.activations.mean(axis=(2, 3)) / y[:, None]
    np.testing.assert_allclose(e.weights, expected, rtol=1e-12)
    np.testing.assert_array_equal(e.maps, np.maximum(gradcam_ref.cam(e.activations, e.weights), 0))
    assert e.gradients is None and e.method == "ablation-cam"


def test_score_cam_on_the_oracle_is_a_softmax_of_masked_scores():
    rng = np.random.default_rng(4)
    oracle = Oracle.random(rng, in_channels=2, widths=[3], kernel_sizes=[3], num_classes=4)
    x = rng.standard_normal((2, 2, 6, 7))
    e = gradcam_ref.explain(oracle, x, [1, 3], method="score-cam", batch_size=2)
    masks = gradcam_ref.score_cam_masks(e.activations, (6, 7))
    for n, c in enumerate([1, 3]):
        scores = np.array([oracle.forward(x[n:n + 1] * masks[n, k])[1][0, c] for k in range(3)])
        expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(e.weights[n], expected, rtol=1e-13)


def test_batch_size_does_not_change_the_perturbation_methods():
    rng = np.random.default_rng(5)
    oracle = Oracle.random(rng, in_channels=2, widths=[5, 5], kernel_sizes=[3, 3], num_classes=3,
                           head="gap-mlp")
    x = rng.standard_normal((2, 2, 8, 8))
    for method in ("score-cam", "ablation-cam"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
            ref = gradcam_ref.explain(oracle, x, [0, 1], layer="relu0", method=method, batch_size=32)
            for b in (1, 2, 4):
                e = gradcam_ref.explain(oracle, x, [0, 1], layer="relu0", method=method, batch_size=b)
                # the batch size changes BLAS blocking (last bits), nothing else
                np.testing.assert_allclose(e.weights, ref.weights, rtol=1e-13, atol=1e-13)


def test_smooth_grad_cam_plus_plus_is_seeded_and_averages_noisy_gradients():
    rng = np.random.default_rng(6)
    oracle = Oracle.random(rng, in_channels=2, widths=[3, 3], kernel_sizes=[3, 3], num_classes=3)
    x = rng.standard_normal((2, 2, 8, 8))
    e1 = gradcam_ref.explain(oracle, x, [0, 2], layer="relu0", method="smooth-grad-cam++", seed=1, n_samples=3)
    e2 = gradcam_ref.explain(oracle, x, [0, 2], layer="relu0", method="smooth-grad-cam++", seed=1, n_samples=3)
    np.testing.assert_array_equal(e1.maps, e2.maps)
    noise = np.random.default_rng(1)
    grads = np.stack([gradcam_ref.explain(oracle, x + 0.3 * noise.standard_normal(x.shape), [0, 2],
                                          layer="relu0").gradients for _ in range(3)])
    np.testing.assert_allclose(e1.maps, gradcam_ref.smooth_grad_cam_plus_plus(e1.activations, grads), rtol=1e-13)
    zero = gradcam_ref.explain(oracle, x, [0, 2], layer="relu0", method="smooth-grad-cam++", std=0.0)
    np.testing.assert_allclose(zero.maps, gradcam_ref.explain(oracle, x, [0, 2], layer="relu0",
                                                              method="grad-cam++").maps, rtol=1e-13)


# --- explain, Explanation and conventions -------------------------------------------------------


def test_unknown_method_and_option_errors_name_the_known_ones():
    oracle = Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2], kernel_sizes=[2], num_classes=2)
    x = np.ones((1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"method must be one of \['grad-cam', 'grad-cam\+\+', 'hirescam'"):
        gradcam_ref.explain(oracle, x, method="gradcam")
    with pytest.raises(TypeError, match="unexpected keyword argument 'eps'"):
        gradcam_ref.explain(oracle, x, method="hirescam", eps=1.0)  # not hirescam's: goes to the backend
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        gradcam_ref.explain(oracle, x, method="score-cam", batch_size=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        gradcam_ref.explain(oracle, x, method="score-cam", variant="pgc")
    with pytest.raises(ValueError, match="sign must be one of"):
        gradcam_ref.explain(oracle, x, method="eigen-cam", sign="positive")
    with pytest.raises(ValueError, match="guided=True is for the gradient methods"):
        gradcam_ref.explain(oracle, x, method="ablation-cam", guided=True)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"method": "grad-cam++", "eps": float("nan")}, ValueError, "eps must be a finite number >= 0, got nan"),
    ({"method": "xgrad-cam", "eps": float("nan")}, ValueError, "eps must be a finite number >= 0, got nan"),
    ({"method": "xgrad-cam", "eps": -1e-7}, ValueError, "eps must be a finite number >= 0, got -1e-07"),
    ({"method": "grad-cam++", "eps": "1e-6"}, TypeError, "eps must be a finite number >= 0, got '1e-6'"),
    ({"method": "grad-cam++", "eps": True}, TypeError, "eps must be a finite number >= 0, got True"),
    ({"method": "eigen-cam", "centre": "no"}, TypeError, "centre must be True or False, got 'no'"),
    ({"method": "eigen-grad-cam", "centre": 1}, TypeError, "centre must be True or False, got 1"),
    ({"guided": "no"}, TypeError, "guided must be True or False, got 'no'"),
    ({"method": "smooth-grad-cam++", "std": float("inf")}, ValueError, "std must be a finite number >= 0, got inf"),
    ({"method": "smooth-grad-cam++", "seed": "a"}, TypeError, "seed must be an int >= 0 or None, got 'a'"),
])
def test_bad_method_options_are_named(options, error, message):
    """Each refused before any work: a NaN eps used to blame the inputs ("overflowed ... use a wider
    dtype"), a string centre or guided read as True, a string eps or seed reached NumPy's internals."""
    oracle = Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2], kernel_sizes=[2], num_classes=2)
    with pytest.raises(error, match=re.escape(message) + "$"):
        gradcam_ref.explain(oracle, np.ones((1, 1, 4, 4)), 0, **options)


def test_heatmap_uses_each_librarys_variant_of_the_method():
    rng = np.random.default_rng(8)
    oracle = Oracle.random(rng, in_channels=2, widths=[4], kernel_sizes=[3], num_classes=3, head="flatten",
                           input_size=7)
    x = rng.standard_normal((2, 2, 7, 7))
    e = gradcam_ref.explain(oracle, x, [0, 1], method="xgrad-cam")
    pgc = e.heatmap(None, "pytorch-grad-cam")
    signed = gradcam_ref.cam(e.activations, gradcam_ref.xgrad_cam_weights(e.activations, e.gradients, eps=1e-7))
    np.testing.assert_array_equal(pgc, gradcam_ref.conventions.postprocess(signed, "pytorch-grad-cam"))
    with pytest.raises(ValueError, match=r"has no 'xgrad-cam' that this convention reproduces: convention must be one of"):
        e.heatmap(None, "captum")
    s = gradcam_ref.explain(oracle, x, [0, 1], method="score-cam")
    with pytest.raises(ValueError, match="variant='pytorch-grad-cam'"):
        s.heatmap((7, 7), "pytorch-grad-cam")
    ok = gradcam_ref.explain(oracle, x, [0, 1], method="score-cam", variant="torchcam")
    np.testing.assert_array_equal(ok.heatmap(None, "torchcam"),
                                  gradcam_ref.conventions.postprocess(ok.signed, "torchcam"))


def test_negative_scores_warn_for_ablation_cam():
    oracle = Oracle.random(np.random.default_rng(9), in_channels=1, widths=[2], kernel_sizes=[2], num_classes=2)
    x = np.random.default_rng(10).standard_normal((4, 1, 5, 5))
    e = gradcam_ref.explain(oracle, x, 0)
    if not (e.scores[:, 0] < 0).any():  # the seeded net has a negative score; say so if that changes
        pytest.fail("the fixture no longer has a negative score for class 0")
    with pytest.warns(gradcam_ref.NonPositiveScoreWarning, match="denominator='abs'"):
        gradcam_ref.explain(oracle, x, 0, method="ablation-cam")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradcam_ref.explain(oracle, x, 0, method="ablation-cam", denominator="abs")


def test_numpy_copies_keep_method_and_options():
    oracle = Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2], kernel_sizes=[2], num_classes=2)
    e = gradcam_ref.explain(oracle, np.ones((1, 1, 4, 4)), method="eigen-cam", centre=True).numpy()
    assert e.method == "eigen-cam" and e.options == (("centre", True),) and e.weights is None


@settings(max_examples=60, deadline=None)
@given(patterns=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
                           elements=st.sampled_from([0.0, -0.0, 1.0, 5e-324, 1e300, -2.5])),
       picks=st.lists(st.integers(0, 3), min_size=1, max_size=12))
def test_distinct_channels_groups_bit_identical_channels_in_order(patterns, picks):
    from gradcam_ref._explain import distinct_channels

    rows = patterns[[p % patterns.shape[0] for p in picks]]  # (K, H, W), channels repeat
    channels, position = distinct_channels(rows)
    assert list(channels) == sorted(channels) and len(position) == len(rows)
    for k in range(len(rows)):  # each channel's set starts at the first channel with its bytes
        first = channels[position[k]]
        assert rows[first].tobytes() == rows[k].tobytes()
        assert all(rows[j].tobytes() != rows[k].tobytes() for j in range(first))
    assert len(channels) == len({r.tobytes() for r in rows})  # -0.0 and 0.0 differ in bits: two sets


def test_torchcam_smooth_weights_by_hand_and_for_target_columns():
    a = np.array([[[[1.0, 2.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    g = np.array([[[[[1.0, -1.0]], [[2.0, 0.0]]]], [[[[3.0, 1.0]], [[0.0, 1.0]]]]])  # (n=2, 1, 2, 1, 2)
    d2 = (g ** 2).mean(axis=0)[0]  # channel 0: [5, 1]; channel 1: [2, .5]
    d3 = (g ** 3).mean(axis=0)[0]  # channel 0: [14, 0]; channel 1: [4, .5]
    pair = (a[0] * d3).sum(axis=(1, 2))  # [14, 1.5]: A paired with D3 position by position
    alpha = d2 / (2 * d2 + pair[:, None, None] + 1e-8)
    expected = (alpha * np.maximum(g[-1, 0], 0)).sum(axis=(1, 2))  # ReLU of the last sample
    np.testing.assert_allclose(gradcam_ref.torchcam_smooth_weights(a, g), [expected], rtol=1e-15)
    both = gradcam_ref.torchcam_smooth_weights(a, np.stack([g, 2 * g], axis=2))  # (n, N, T=2, K, ...)
    np.testing.assert_allclose(both[:, 0], [expected], rtol=1e-15)
    np.testing.assert_allclose(both[:, 1], gradcam_ref.torchcam_smooth_weights(a, 2 * g), rtol=1e-15)


# --- sums past the largest number, half precision --------------------------------------------------

eighths = st.integers(-64, 64).map(lambda i: i / 8)  # exact after any power-of-two scaling that stays normal


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, (2, 3, 2, 3), elements=eighths.map(abs)), hnp.arrays(np.float64, (2, 3, 2, 3), elements=eighths),
       st.integers(1000, 1020), st.integers(-1000, 1020), st.booleans())
def test_xgrad_cam_weights_of_scaled_inputs_are_the_weights_scaled(a, g, i, j, multi):
    """sum A past the largest float64 (A near 1e308) raised 'overflowed' or gave a silent zero weight,
    and so did sum G A; scaling A by 2^i cancels in the ratio and G's 2^j multiplies it: exactly."""
    if multi:
        g = np.stack([g, -g / 2], axis=1)  # (N, T=2, K, ...)
    want = gradcam_ref.xgrad_cam_weights(a, g)
    got = gradcam_ref.xgrad_cam_weights(a * 2.0**i, g * 2.0**j)
    np.testing.assert_array_equal(got, want * 2.0**j)


def test_xgrad_cam_weights_where_the_sums_overflow():
    a, g = np.full((1, 1, 2, 2), 1e308), np.full((1, 1, 2, 2), 0.5)
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam_weights(a, g), [[0.5]])  # sum A and sum G A: 2e308 and 4e308
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam_weights(a, g * 2e-10, eps=1e-7), [[1e-10]])  # was 0, silently
    np.testing.assert_array_equal(gradcam_ref.xgrad_cam_weights(np.full((1, 1, 1, 2), 1e200), np.full((1, 1, 1, 2), 3e200)),
                                  [[3e200]])  # G A = 3e400: the products overflowed


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_xgrad_cam_in_half_precision_is_the_float32_result_cast(dtype):
    """float16 activations summing past 65504 (500 over 14x14) made every weight num / inf = 0: an all-zero map."""
    import torch

    dtype = getattr(torch, dtype)
    rng = np.random.default_rng(0)
    a = torch.tensor(np.abs(rng.standard_normal((1, 2, 14, 14))) * 500, dtype=dtype)
    g = torch.tensor(rng.standard_normal((1, 2, 14, 14)) * 1e-3, dtype=dtype)
    weights = gradcam_ref.xgrad_cam_weights(a, g, eps=1e-7)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights, gradcam_ref.xgrad_cam_weights(a.float(), g.float(), eps=1e-7).to(dtype),
                               rtol=0, atol=0)
    wide = gradcam_ref.xgrad_cam(a.double(), g.double(), relu=False)
    torch.testing.assert_close(gradcam_ref.xgrad_cam(a, g, relu=False).double(), wide, rtol=0,
                               atol=16 * torch.finfo(dtype).eps * float(wide.abs().max()))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, (2, 4), elements=st.floats(-30, 30)),
       hnp.arrays(np.float64, (2,), elements=st.one_of(st.floats(-1e308, 1e308), st.sampled_from([1e17, -1e308, 1e308]))))
def test_score_cam_weights_do_not_depend_on_the_baseline_even_in_rounding(s, b):
    """The softmax cancels the baseline; s - b was rounded (or overflowed) first: s = [0, 1], b = 1e17 gave [.5, .5]."""
    np.testing.assert_array_equal(gradcam_ref.score_cam_weights(s, baseline=b), gradcam_ref.score_cam_weights(s))


def test_score_cam_weights_check_the_baseline():
    np.testing.assert_allclose(gradcam_ref.score_cam_weights(np.array([[0.0, 1.0]]), baseline=np.array([1e17])),
                               [[1 / (1 + np.e), np.e / (1 + np.e)]], rtol=1e-15)
    np.testing.assert_array_equal(gradcam_ref.score_cam_weights(np.array([[1e308, 1e308]]), baseline=np.array([-1e308])),
                                  [[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"baseline contains NaN or Inf \(1 of 1 values\)"):
        gradcam_ref.score_cam_weights(np.zeros((1, 3)), baseline=np.array([np.nan]))
    with pytest.raises(ValueError, match=r"baseline must have shape \(1,\) \(one score per example\), got \(2,\)"):
        gradcam_ref.score_cam_weights(np.zeros((1, 3)), baseline=np.zeros(2))


@settings(max_examples=60, deadline=None)
@given(eighths.filter(bool), hnp.arrays(np.float64, (3,), elements=eighths), st.integers(1000, 1020),
       st.sampled_from(["score", "abs"]))
def test_ablation_cam_weights_of_scores_near_the_largest_float(y, yk, k, denominator):
    """y - y_k past the largest float (scores near 1e308 of opposite signs) raised 'overflowed' where the
    ratio fits: scaling both by 2^k leaves the weights as they are, exactly."""
    want = gradcam_ref.ablation_cam_weights(np.array([y]), yk[None], denominator=denominator)
    got = gradcam_ref.ablation_cam_weights(np.array([y * 2.0**k]), yk[None] * 2.0**k, denominator=denominator)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(gradcam_ref.ablation_cam_weights(np.array([1e308]), np.array([[-1e308, 0.0]])),
                                  [[2.0, 1.0]])


def test_torchcam_smooth_weights_name_a_zero_denominator():
    """torchcam's formula is kept; where it divides 0 by 0 the message said 'overflowed'."""
    import torch

    a, g = torch.ones(1, 2, 3, 3, dtype=torch.float16), torch.full((2, 1, 2, 3, 3), 1e-4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"divides 0 by 0 at 18 position\(s\), .*: eps=1e-08 and the powers of "
                                         r"noisy_gradients underflow to 0 in torch.float16: compute in a wider dtype"):
        gradcam_ref.torchcam_smooth_weights(a, g)  # g^2 = 1e-8, g^3 and eps underflow in float16
    assert torch.isfinite(gradcam_ref.torchcam_smooth_weights(a.float(), g.float())).all()
    with pytest.raises(ValueError, match=r"divides 0 by 0 at 4 position\(s\), .*: eps=0, and noisy_gradients"):
        gradcam_ref.torchcam_smooth_weights(np.ones((1, 1, 2, 2)), np.zeros((2, 1, 1, 2, 2)), eps=0.0)


def test_power_of_two_scaling_under_jax_where_reciprocals_flush_to_zero():
    """XLA divides as x * (1 / d) and flushes a subnormal 1 / d to zero: a scale of 2^1023 zeroed FEM's
    activations past 4.5e307 (an all-zero map, silently), and would have zeroed XGrad-CAM's rescaled sums."""
    import jax

    a = np.zeros((1, 2, 1, 4))
    a[0, 0], a[0, 1] = [0.0, 0.0, 0.0, 1.6e308], 1e308
    with jax.enable_x64(True):
        jnp = jax.numpy
        np.testing.assert_array_equal(np.asarray(gradcam_ref.fem(jnp.asarray(a), k=1.0)), gradcam_ref.fem(a, k=1.0))
        np.testing.assert_array_equal(gradcam_ref.fem(a, k=1.0), [[[1e308, 1e308, 1e308, 1e308 + 1.6e308 / 4]]])
        weights = gradcam_ref.xgrad_cam_weights(jnp.full((1, 1, 2, 2), 1e308), jnp.full((1, 1, 2, 2), 0.5))
        np.testing.assert_array_equal(np.asarray(weights), [[0.5]])


# --- Score-CAM and Ablation-CAM in half precision: the activations' dtype --------------------------


def spy_on_score_weights(monkeypatch):
    """Record the weights ``explain`` computes from the scores for Score-CAM (its paper variant) and
    Ablation-CAM, before the core casts them to the activations' dtype: ``{method: weights}``."""
    import gradcam_ref._explain as explain_module

    seen = {}

    def spy(method, wrapped):
        def recorded(*args, **kwargs):
            seen[method] = wrapped(*args, **kwargs)
            return seen[method]
        return recorded

    for method, name in (("score-cam", "score_cam_weights"), ("ablation-cam", "ablation_cam_weights")):
        monkeypatch.setattr(explain_module, name, spy(method, getattr(explain_module, name)))
    return seen


def assert_the_float32_map_cast(maps, weights, activations, weights32, cast, u):
    r"""Score-CAM's and Ablation-CAM's half-precision ``maps`` and ``weights`` against their float32 computation.

    All as float64 NumPy: ``activations`` (half) ``(N, K, *S)``, ``weights32`` the float32 weights the scores
    gave ``(N, K)``; ``cast`` rounds float64 values to the half dtype, whose unit roundoff is ``u`` (float16
    2^-11, bfloat16 2^-8). The weights are the float32 ones cast, exactly. The reference map is
    :math:`\mathrm{ReLU}(\sum_k w_k A^k)` of the float32 weights, formed exactly (each product of a half and
    a float32 number is exact in float64) and cast once. The maps are formed from the cast weights (so that
    ``signed`` is the weighted sum of ``Explanation.weights``, as for the gradient methods): each weight's
    rounding moves its term by at most u of it (below float16's smallest normal, 6.1e-5, by an absolute
    2^-25 times :math:`|A^k|`), the float32 sum adds at most K 2^-24 of :math:`\sum_k |w_k A^k|`, and the
    two final roundings u of the value each (2^-25 below the smallest normal): so
    :math:`|maps - cast(ref)| \le (3u + K\, 2^{-24}) \sum_k |w_k A^k| + 2^{-25} (\sum_k |A^k| + 2)`.
    A float16 sum (no widening) would be off by far more where a partial sum passes 65504, or inf.
    """
    np.testing.assert_array_equal(weights, cast(weights32))
    k = activations.shape[1]
    exact = np.einsum("nk,nk...->n...", weights32, activations)
    size = np.einsum("nk,nk...->n...", np.abs(weights32), np.abs(activations))
    tol = (3 * u + k * 2.0 ** -24) * size + 2.0 ** -25 * (np.abs(activations).sum(axis=1) + 2)
    error = np.abs(maps - cast(np.maximum(exact, 0.0)))
    assert np.all(error <= tol), (error.max(), error[error > tol], tol[error > tol])


def test_given_weights_fields_keep_the_activations_dtype_and_sum_in_float32():
    """Weights computed elsewhere (Score-CAM's and Ablation-CAM's from float32 scores) meet float16 activations:
    the weights are cast to float16 and the map is summed in float32, cast back, as the gradient methods' are;
    before, the map came back in float32 (array promotion). Partial sums past 65504 (60000 + 60000 - 60000)
    do not overflow. Equal dtypes of 32 bits or more are computed as cam() computes them, bit for bit."""
    from gradcam_ref._methods import given_weights_fields

    a = np.array([[[[60000.0, 1.0, 0.5]], [[60000.0, 2.0, 0.25]], [[-60000.0, 3.0, 0.0]]]], np.float16)
    w = np.array([[1.0, 1.0 / 3.0, 1.0]], np.float32)  # 1/3 is not a float16 number
    weights, signed = given_weights_fields(np, a, w)
    assert weights.dtype == np.float16 and signed.dtype == np.float16
    np.testing.assert_array_equal(weights, w.astype(np.float16))
    wide = np.einsum("nk,nk...->n...", weights.astype(np.float32), a.astype(np.float32))
    np.testing.assert_array_equal(signed, wide.astype(np.float16))  # the float32 sum, cast once
    assert float(signed[0, 0, 0]) == 20000.0  # 60000 (1 + 0.33325 - 1): a float16 partial sum of 80000 is inf
    assert_the_float32_map_cast(np.maximum(signed, 0).astype(np.float64), weights.astype(np.float64),
                                a.astype(np.float64), w.astype(np.float64),
                                lambda v: np.asarray(v).astype(np.float16).astype(np.float64), 2.0 ** -11)
    with pytest.raises(ValueError, match=r"overflowed: .*\(float16\); compute in a wider dtype"):
        given_weights_fields(np, a, np.array([[1.0, 70000.0, 1.0]], np.float32))  # a weight past 65504
    with pytest.raises(ValueError, match=r"overflowed: .*\(float16\); compute in a wider dtype"):
        given_weights_fields(np, a, np.array([[1.0, 1.0, -1.0]], np.float32))  # a map of 180000
    import torch

    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 2, 3))
    weights, signed = given_weights_fields(np, a, w)  # as before: cam(), with the weights as given
    assert weights is w
    np.testing.assert_array_equal(signed, gradcam_ref.cam(a, w))
    for dtype in (torch.float32, torch.float64):  # (NumPy float32 is float64 in the core)
        ta, tw = torch.tensor(a, dtype=dtype), torch.tensor(w, dtype=dtype)
        weights, signed = given_weights_fields(gradcam_ref._arrays.namespace(ta), ta, tw)
        assert weights is tw and signed.dtype == dtype
        assert torch.equal(signed, gradcam_ref.cam(ta, tw))


# --- arguments checked by type and range before use (an adversarial sweep's findings) ------------


def test_score_cam_weights_need_one_library_and_an_n_by_k_shape():
    import torch

    s = np.array([[0.0, 1.0, 2.0]])
    want = np.exp(s - 2.0) / np.exp(s - 2.0).sum()
    torch.testing.assert_close(gradcam_ref.score_cam_weights(torch.tensor(s), baseline=torch.tensor([5.0])),
                               torch.tensor(want), rtol=1e-15, atol=0)
    with pytest.raises(TypeError, match=r"^arrays must all come from one library, got mask_scores: torch.Tensor, "
                                        r"baseline: numpy.ndarray$"):
        gradcam_ref.score_cam_weights(torch.tensor(s), baseline=np.array([0.0]))  # was a raw torch error
    for bad in (np.array(1.0), np.array([0.0, 1.0]), np.zeros((1, 2, 2, 2))):  # 0-d gave 1.0, (K,) a softmax
        with pytest.raises(ValueError, match=rf"^mask_scores must have shape \(N, K\) or \(N, T, K\), got shape "
                                             rf"{re.escape(str(bad.shape))}$"):
            gradcam_ref.score_cam_weights(bad)


def test_ablated_activations_check_example_channels_and_chunk():
    import jax.numpy as jnp

    np.testing.assert_array_equal(gradcam_ref.ablated_activations(A, np.int64(0), np.array([1])),
                                  gradcam_ref.ablated_activations(A, 0, [1]))
    two = np.concatenate([A, A + 1.0])
    np.testing.assert_array_equal(gradcam_ref.ablated_activations(two, 1, range(2))[0, 1], two[1, 1])
    assert gradcam_ref.ablated_activations(A, 0, []).shape == (0, 2, 2, 2)
    for bad, error in ((None, TypeError), (True, TypeError), (1.0, TypeError), (1, ValueError), (-1, ValueError)):
        for library in (np.asarray, jnp.asarray):  # JAX clamped example=5 to the last one, NumPy raised IndexError
            with pytest.raises(error, match=r"^example must be an int in \[0, 1\) \(an example of activations "
                                            rf"\(1, 2, 2, 2\)\), got {re.escape(repr(bad))}$"):
                gradcam_ref.ablated_activations(library(A), bad, [0])
    for bad in (None, "ab", [0.5], [True], [[0]]):  # None: 'no len()'; floats were truncated
        with pytest.raises(TypeError, match=rf"^channels must be a sequence of ints \(channel indices\), got "
                                            rf"{re.escape(repr(bad))}$"):
            gradcam_ref.ablated_activations(A, 0, bad)
    for bad, error in ((0, ValueError), (-1, ValueError), ("a", TypeError), (2.0, TypeError)):  # 0: IndexError
        with pytest.raises(error, match=rf"^chunk must be an int >= 1, got {re.escape(repr(bad))}$"):
            gradcam_ref.ablated_activations(A - 1.0, 0, [0], value="pytorch-grad-cam", chunk=bad)


def test_layercam_scale_spatial_rank_and_maps_without_positive_values():
    m = np.array([[[0.0, 1.0], [2.0, 4.0]]])  # (N, T, s) = (1, 2, 2)
    np.testing.assert_allclose(gradcam_ref.layercam_scale(m, spatial_rank=1), np.tanh(2 * m / [[[1.0], [4.0]]]))
    np.testing.assert_allclose(gradcam_ref.layercam_scale(m, spatial_rank=np.int64(2)), np.tanh(2 * m / 4.0))
    for bad in (-1, 0, 3, 10**30, 1.0, True, "1"):  # -1 and 0 scaled by the wrong maximum, 5: 'duplicate value'
        with pytest.raises(ValueError, match=r"^spatial_rank must be an int in \[1, 2\] for maps of shape \(1, 2, 2\) "
                                             rf"\(a batch axis first\), got {re.escape(repr(bad))}$"):
            gradcam_ref.layercam_scale(m, spatial_rank=bad)
    # the equation of the docstring: tanh(gamma L / max L) where max L > 0 (negative values kept), else 0
    signed = np.array([[-2.0, 1.0, 4.0], [-3.0, -1.0, -2.0]])
    np.testing.assert_allclose(gradcam_ref.layercam_scale(signed), [np.tanh(2 * signed[0] / 4.0), [0.0, 0.0, 0.0]])


def test_noisy_gradients_are_named_as_such():
    a, g = np.ones((1, 2, 2, 3)), np.ones((3, 1, 2, 2, 3))
    for call in (gradcam_ref.smooth_grad_cam_plus_plus, gradcam_ref.torchcam_smooth_weights):
        with pytest.raises(ValueError, match=r"^noisy_gradients must have the shape of activations \(1, 2, 2, 3\) "
                                             r"after a leading axis of n >= 1 samples or the multi-target shape "
                                             r"\(n, N, T, K, \*spatial\) = \('n', 1, 'T', 2, 2, 3\), "
                                             r"got shape \(3, 1, 1, 2, 3\)$"):
            call(a, g[:, :, :1])
        with pytest.raises(TypeError, match=r"^noisy_gradients must have a real numeric dtype, got complex128$"):
            call(a, g.astype(complex))
    with pytest.raises(ValueError, match=r"^noisy_gradients must have the shape .* got shape \(0, 1, 2, 2, 3\)$"):
        gradcam_ref.smooth_grad_cam_plus_plus(a, g[:0])
    # the multi-target layout still passes: (n, N, T, K, *spatial)
    np.testing.assert_array_equal(gradcam_ref.smooth_grad_cam_plus_plus(a, g[:, :, None])[:, 0],
                                  gradcam_ref.smooth_grad_cam_plus_plus(a, g))


def test_score_cam_masks_size_error_names_the_activations():
    a = np.ones((2, 2, 3))  # N=2, K=2, one spatial axis of 3: size (4, 6) is one value too many
    with pytest.raises(ValueError, match=r"^size must be a positive int or 1 positive int \(one per spatial axis\), "
                                         r"got \(4, 6\), for activations of shape \(2, 2, 3\) \(N, K and 1 spatial "
                                         r"axis\)$"):
        gradcam_ref.score_cam_masks(a, (4, 6))
    assert gradcam_ref.score_cam_masks(a, (6,)).shape == (2, 2, 6)
