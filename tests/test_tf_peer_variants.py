"""The TensorFlow peers' variants in the core: FEM (xplique), Grad-CAM++ and Score-CAM as tf-keras-vis
computes them. Hand goldens, the libraries' steps transcribed in NumPy, ties and extreme values.

The libraries themselves: tests/backends/test_tf_peers.py (in the TensorFlow test session).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import fem, grad_cam_plus_plus, score_cam_masks, tf_keras_vis_plus_plus_weights
from gradcam_ref._methods import method_fields
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.conventions import describe, postprocess
from tests.strategies import SMALLEST_NORMAL, edgy_arrays, feature_maps, moderate_values

# --- FEM ------------------------------------------------------------------------------------------


def fem_by_the_definition(a: np.ndarray, k: float) -> np.ndarray:
    """sum_l mu_l [A_l >= mu_l + k sigma_l] in exact rational arithmetic (k >= 0): A - mu >= 0 and
    (A - mu)^2 >= k^2 sigma^2, with mu and sigma^2 as fractions; only mu_l is rounded, once."""
    from fractions import Fraction

    n, channels = a.shape[:2]
    out = np.zeros((n, *a.shape[2:]))
    for i in range(n):
        for c in range(channels):
            values = [Fraction(v) for v in a[i, c].ravel().tolist()]
            mu = sum(values) / len(values)
            var = sum((v - mu) ** 2 for v in values) / len(values)
            kk = Fraction(k) ** 2
            mask = np.array([v - mu >= 0 and (v - mu) ** 2 >= kk * var for v in values]).reshape(a.shape[2:])
            out[i] += float(mu) * mask
    return out


def assert_fem_is_its_definition(a: np.ndarray, k: float) -> None:
    """``fem(a, k=k, relu=False)`` against sum_l mu_l [A_l >= mu_l + k sigma_l] computed in exact
    rational arithmetic, to float rounding and no further. A float sum of Z terms is within about
    Z eps max|A_l| of the exact one, not closer (hypothesis found [9.9e-31, 1, -1], whose float
    mean is 0 and exact mean 3.3e-31), so, channel by channel (FEM's statistics are per channel):
    the value is mu_l within that band where the exact rule keeps a position, 0 where it drops it,
    and either of the two only where the exact margin A - mu - k sigma is inside the band (there
    rounding decides, e.g. the tie of [-1, -1.8e-203] at k = 1). The map is the channels' sum."""
    from fractions import Fraction

    n, channels = a.shape[:2]
    z = int(np.prod(a.shape[2:]))
    eps = float(np.finfo(np.float64).eps)
    per_channel = []
    for c in range(channels):
        got = fem(a[:, c:c + 1], k=k, relu=False)
        per_channel.append(got)
        for i in range(n):
            values = [Fraction(v) for v in a[i, c].ravel().tolist()]
            mu = sum(values) / len(values)
            var = sum((v - mu) ** 2 for v in values) / len(values)
            top = max(abs(v) for v in values) or Fraction(1)  # margins in units of max|A_l|: no overflow
            band = 4 * (1 + k) * z * eps + 1e-320 / float(top)
            sigma = float(var / top**2) ** 0.5
            for j, v in enumerate(values):
                kept = v - mu >= 0 and (v - mu) ** 2 >= Fraction(k) ** 2 * var
                value = float(got[i].ravel()[j])
                near_mu = abs(Fraction(value) - mu) / top <= band
                if abs(float((v - mu) / top) - k * sigma) <= band:
                    assert value == 0.0 or near_mu, (c, i, j, value, float(mu))
                elif kept:
                    assert near_mu, (c, i, j, value, float(mu))
                else:
                    assert value == 0.0, (c, i, j, value)
    whole = fem(a, k=k, relu=False)
    parts = np.stack(per_channel)
    np.testing.assert_allclose(whole, parts.sum(axis=0), rtol=0,
                               atol=channels * 4 * eps * float(np.abs(parts).sum(axis=0).max()) + 1e-320)


def test_fem_golden_by_hand():
    # channel 0: [0, 0, 0, 4]: mu 1, sigma sqrt(3); k = 1: only the 4 passes 1 + 1.73
    # channel 1: constant 1: sigma 0, every position passes (ties are in), weight 1
    a = np.array([[[[0.0, 0.0, 0.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]]])
    np.testing.assert_array_equal(fem(a, k=1.0), [[[1.0, 1.0, 1.0, 2.0]]])
    # k = 2: 4 < 1 + 2 sqrt(3) = 4.46: channel 0 adds nothing
    np.testing.assert_array_equal(fem(a, k=2.0), [[[1.0, 1.0, 1.0, 1.0]]])
    # negative means: the signed map keeps them, the map's ReLU removes them
    np.testing.assert_array_equal(fem(-a, k=1.0, relu=False), [[[-1.0, -1.0, -1.0, -1.0]]])
    np.testing.assert_array_equal(fem(-a, k=1.0), np.zeros((1, 1, 4)))


@settings(max_examples=100, deadline=None)
@given(feature_maps(elements=moderate_values, multi=False), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]))
def test_fem_equals_its_definition_on_ties_zeros_and_subnormals(maps, k):
    a, _ = maps
    assert_fem_is_its_definition(a, k)


@settings(max_examples=100, deadline=None)
@given(edgy_arrays((2, 3, 3, 2)))
def test_fem_of_huge_values_is_exact_or_refused_as_an_overflow(a):
    """Up to the largest float64: the statistics never overflow; only a map beyond it is refused."""
    with np.errstate(over="ignore"):
        expected = fem_by_the_definition(a, 2.0)
    if np.isfinite(expected).all():
        assert_fem_is_its_definition(a, 2.0)
    else:
        with pytest.raises(ValueError, match=r"fem overflowed: the inputs activations are finite"):
            fem(a, relu=False)


@settings(max_examples=100, deadline=None)
@given(edgy_arrays((2, 3, 3, 2), elements=moderate_values), st.integers(-60, 60))
def test_fem_commutes_with_powers_of_two(a, e):
    """Scaling A by 2^e scales the map by 2^e exactly: the same masks, ties included."""
    scaled, base = a * 2.0 ** e, fem(a, relu=False)
    normal = all((np.abs(x[x != 0]) >= SMALLEST_NORMAL * 64).all() for x in (a, scaled, base, base * 2.0 ** e))
    if normal:  # subnormals (inputs, channel means or maps) lose bits when scaled
        np.testing.assert_array_equal(fem(scaled, relu=False), base * 2.0 ** e)


def test_fem_is_class_agnostic_and_one_map_per_target():
    a = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    g = np.random.default_rng(1).standard_normal((2, 2, 3, 4, 4))
    fields = method_fields("fem", a, g, k=1.5)
    assert fields.weights is None
    np.testing.assert_array_equal(fields.signed, np.broadcast_to(fem(a, k=1.5, relu=False)[:, None], (2, 2, 4, 4)))


def test_fem_refuses_bad_k_and_bad_activations():
    a = np.ones((1, 1, 2, 2))
    for k in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match=r"k must be a finite number of standard deviations, got"):
            fem(a, k=k)
    with pytest.raises(ValueError, match=r"activations contains NaN or Inf"):
        fem(np.array([[[[1.0, np.nan]]]]))


def test_fem_through_explain_and_the_xplique_convention_keeps_negative_values():
    rng = np.random.default_rng(3)
    oracle = Oracle.random(rng, in_channels=2, widths=[4, 5], kernel_sizes=[3, 3], num_classes=3)
    x = rng.standard_normal((2, 2, 9, 8))
    e = gradcam_ref.explain(oracle, x, [0, 2], layer="conv1", method="fem", k=1.0)  # before the ReLU
    expected = fem_by_the_definition(e.activations, 1.0)
    assert (expected < 0).any()  # negative channel means at a convolution's output
    np.testing.assert_allclose(e.signed, expected, rtol=1e-12)
    np.testing.assert_array_equal(e.maps, np.maximum(e.signed, 0))
    xplique = e.heatmap((9, 8), "xplique")  # no ReLU: bicubic resize of the signed map
    np.testing.assert_array_equal(xplique, postprocess(e.signed, "xplique", size=(9, 8), method="fem"))
    assert (xplique < 0).any()
    paper = e.heatmap((9, 8), "paper")
    assert paper.min() == 0.0 and paper.max() == 1.0
    with pytest.raises(ValueError, match=r"has no 'fem' that this convention reproduces: convention must be one of \['paper', 'xplique'\]"):
        e.heatmap((9, 8), "pytorch-grad-cam")
    assert "fem:\n    its steps: resize to the requested size: bicubic" in describe("xplique")


# --- Grad-CAM++ as tf-keras-vis 0.8.7 computes it -----------------------------------------------


def tf_keras_vis_steps(a: np.ndarray, g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """GradcamPlusPlus's lines (gradcam_plus_plus.py), channels-first, one target per example, float64."""
    score = np.exp(y).reshape(-1, *([1] * (g.ndim - 1)))
    first = score * g
    second = first * g
    third = second * g
    global_sum = a.sum(axis=(2, 3), keepdims=True)
    denom = second * 2.0 + third * global_sum
    denom = denom + (second == 0.0)
    alphas = second / denom
    norm = alphas.sum(axis=(2, 3), keepdims=True)
    alphas = alphas / (norm + (norm == 0.0))
    weights = (np.maximum(first, 0) * alphas).sum(axis=(2, 3))
    return weights


def test_tf_keras_vis_plus_plus_golden_by_hand():
    a = np.array([[[[1.0, 1.0]]]])  # S = 2
    g = np.array([[[[1.0, -0.25]]]])  # alpha = [1 / (2 + 2), 1 / (2 - 0.5)] = [1/4, 2/3]
    w = tf_keras_vis_plus_plus_weights(a, g, np.array([np.log(3.0)]))
    np.testing.assert_allclose(w, [[3.0 * 0.25 / (0.25 + 2 / 3)]], rtol=1e-15)
    # the paper's closed form: sum alpha ReLU(g) = 1/4, no division by the alphas' sum, no exp
    np.testing.assert_allclose(grad_cam_plus_plus(a, g, relu=False), [[[0.25, 0.25]]], rtol=1e-15)


def tf_keras_vis_conditioning(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``(N, K)``: how much the weights amplify rounding. ``alpha = 1 / (2 + S g)`` where ``g != 0``
    cancels near ``g = -2/S`` (by ``(2 + |S g|) / |2 + S g|``), and the alphas' sum cancels where
    they differ in sign (by ``sum |alpha| / |sum alpha|``)."""
    sg = a.sum(axis=(2, 3), keepdims=True) * g
    nonzero = g != 0
    denominator = np.where(nonzero, 2 + sg, 1.0)
    alphas = np.where(nonzero, 1 / denominator, 0.0)
    near_pole = np.where(nonzero, (2 + np.abs(sg)) / np.abs(denominator), 1.0).max(axis=(2, 3))
    total = np.abs(alphas.sum(axis=(2, 3)))
    signs = np.where(total > 0, np.abs(alphas).sum(axis=(2, 3)) / np.where(total > 0, total, 1.0), 1.0)
    return near_pole * signs


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
@example(2953, False)  # g = -0.2132 with S = 9.39: 2 + S g = 1.3e-4, both ways off the exact value by 1e-12
def test_tf_keras_vis_plus_plus_equals_its_lines(seed, with_zeros):
    """Equal to the lines within rounding amplified by the conditioning (1e-12 at best): near a pole of
    alpha neither is exact (mpmath, seed 2953: ours 6e-13, the lines 3e-12 from the true weight)."""
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.standard_normal((2, 3, 4, 3)), 0)
    g = rng.standard_normal((2, 3, 4, 3)) * 0.1
    if with_zeros:  # exact zeros in the gradients (alpha 0 there) and a dead channel (all-zero alphas)
        g[g < 0] = 0.0
        g[0, 1] = 0.0
    y = rng.standard_normal(2) * 3
    got, want = tf_keras_vis_plus_plus_weights(a, g, y), tf_keras_vis_steps(a, g, y)
    tolerance = 1e-12 * tf_keras_vis_conditioning(a, g) * np.abs(want) + 1e-300
    assert np.all(np.abs(got - want) <= tolerance), (got, want, tolerance)


def test_tf_keras_vis_plus_plus_targets_exp_overflow_and_options():
    rng = np.random.default_rng(0)
    a, g = rng.random((2, 3, 2, 2)), rng.standard_normal((2, 2, 3, 2, 2))
    y = rng.standard_normal((2, 2))
    w = tf_keras_vis_plus_plus_weights(a, g, y)
    for t in range(2):  # (N, T) targets: each target alone
        np.testing.assert_allclose(w[:, t], tf_keras_vis_plus_plus_weights(a, g[:, t], y[:, t]), rtol=1e-14)
    import torch  # NumPy arrays are computed in float64, torch's keep float32
    big = torch.tensor([[100.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"target_scores: exp\(y\^c\) overflows torch.float32 \(largest score 100\)"):
        tf_keras_vis_plus_plus_weights(torch.from_numpy(a).float(), torch.from_numpy(g).float(), big)
    got = tf_keras_vis_plus_plus_weights(torch.from_numpy(a).float(), torch.from_numpy(g).float(), big / 2)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()  # exp(50) fits
    with pytest.raises(ValueError, match=r"target_scores must have shape \(2, 2\) \(one per map\), got \(2,\)"):
        tf_keras_vis_plus_plus_weights(a, g, y[:, 0])
    with pytest.raises(ValueError, match=r"variant='tf-keras-vis' multiplies the weights by exp\(y\^c\): pass "
                                         r"target_scores"):
        grad_cam_plus_plus(a, g, variant="tf-keras-vis")
    with pytest.raises(ValueError, match=r"eps is for variant='paper'"):
        grad_cam_plus_plus(a, g, variant="tf-keras-vis", target_scores=y, eps=1e-6)
    with pytest.raises(ValueError, match=r"variant must be one of \('paper', 'tf-keras-vis', 'torchcam'\), got 'official'"):
        grad_cam_plus_plus(a, g, variant="official")


def test_grad_cam_plus_plus_variant_through_explain_and_the_conventions():
    rng = np.random.default_rng(7)
    oracle = Oracle.random(rng, in_channels=2, widths=[4, 5], kernel_sizes=[3, 3], num_classes=3, head="flatten",
                           input_size=9)  # gradients that vary over space
    x = rng.standard_normal((2, 2, 9, 9))
    e = gradcam_ref.explain(oracle, x, [1, 2], layer="relu1", method="grad-cam++", variant="tf-keras-vis")
    y = e.scores[[0, 1], [1, 2]]
    np.testing.assert_allclose(e.weights, tf_keras_vis_steps(e.activations, e.gradients, y), rtol=1e-12)
    paper = gradcam_ref.explain(oracle, x, [1, 2], layer="relu1", method="grad-cam++")
    # each convention recomputes its own variant from (A, G) and the scores
    np.testing.assert_allclose(paper.heatmap((9, 9), "tf-keras-vis"), e.heatmap((9, 9), "tf-keras-vis"), rtol=1e-13)
    np.testing.assert_allclose(e.heatmap(None, "pytorch-grad-cam"), paper.heatmap(None, "pytorch-grad-cam"),
                               rtol=1e-13)
    np.testing.assert_allclose(e.heatmap((9, 9), "paper"), paper.heatmap((9, 9), "paper"), rtol=1e-13)
    per_map = (slice(None), None, None)
    own, papers = e.maps / e.maps.max(axis=(1, 2))[per_map], paper.maps / paper.maps.max(axis=(1, 2))[per_map]
    assert np.abs(own - papers).max() > 1e-2  # the variant's own map has another shape
    import torch

    from gradcam_ref.verify.twins import torch_oracle

    with pytest.raises(ValueError, match=r"pass class targets \(ints\), not a callable"):
        gradcam_ref.explain(torch_oracle(oracle, inplace=False), torch.from_numpy(x), lambda s: s[:, 0],
                            layer="relu1", method="grad-cam++", variant="tf-keras-vis")


# --- Score-CAM as tf-keras-vis 0.8.7 computes it ------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_tf_keras_vis_score_cam_masks_are_scipy_zoom_then_min_max(h, w, out_h, out_w, seed):
    a = np.random.default_rng(seed).standard_normal((2, 3, h, w))
    a[0, 1] = 0.25  # a flat channel: a zero mask
    zoomed = scipy.ndimage.zoom(np.moveaxis(a, 1, -1), (1, out_h / h, out_w / w, 1), order=1, mode="nearest")
    low, high = zoomed.min(axis=(1, 2), keepdims=True), zoomed.max(axis=(1, 2), keepdims=True)
    expected = np.moveaxis((zoomed - low) / (high - low + 1e-7), -1, 1)
    got = score_cam_masks(a, (out_h, out_w), variant="tf-keras-vis")
    # scipy's zoom of a flat channel wobbles by ulps of 0.25, which / 1e-7 make ~1e-9; ours stays flat: 0
    assert (got[0, 1] == 0).all() and np.abs(expected[0, 1]).max() < 1e-8
    expected[0, 1] = 0.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_tf_keras_vis_score_cam_weights_are_the_probabilities_of_masked_inputs():
    rng = np.random.default_rng(4)
    oracle = Oracle.random(rng, in_channels=2, widths=[3], kernel_sizes=[3], num_classes=4)
    x = rng.standard_normal((2, 2, 6, 7))
    e = gradcam_ref.explain(oracle, x, [1, 3], method="score-cam", variant="tf-keras-vis", batch_size=2)
    masks = score_cam_masks(e.activations, (6, 7), variant="tf-keras-vis")
    for n, c in enumerate([1, 3]):
        logits = np.stack([oracle.forward(x[n:n + 1] * masks[n, k])[1][0] for k in range(3)])
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(e.weights[n], (p / p.sum(axis=1, keepdims=True))[:, c], rtol=1e-13)
    assert "score-cam:" in describe("tf-keras-vis") and "max_N (Faster-ScoreCAM)" in describe("tf-keras-vis")


def test_faster_score_cam_keeps_the_union_over_the_batch_of_each_examples_top_channels():
    from gradcam_ref._explain import faster_score_cam_channels

    a = np.zeros((2, 4, 1, 3))
    a[0, 2] = [0.0, 1.0, 2.0]  # example 0: channel 2 spreads most
    a[1, 0] = [0.0, 0.0, 5.0]  # example 1: channel 0
    a[1, 3] = [0.0, 0.0, 5.0]  # a tie with channel 0: the lower channel first (tf.math.top_k)
    like = np.ones((2, 4))
    np.testing.assert_array_equal(faster_score_cam_channels(a, 1, like=like), [[1, 0, 1, 0]] * 2)
    np.testing.assert_array_equal(faster_score_cam_channels(a[:1], 1, like=like[:1]), [[0, 0, 1, 0]])
    np.testing.assert_array_equal(faster_score_cam_channels(a, 4, like=np.ones((2, 3, 4))), np.ones((2, 3, 4)))
    for bad in (0, 5, 1.0, True):
        with pytest.raises(ValueError, match=rf"max_n must be an int in \[1, 5\) \(the layer's channels\), got {bad}$"):
            faster_score_cam_channels(a, bad, like=like)


def test_max_n_zeroes_the_weights_of_the_channels_left_out():
    rng = np.random.default_rng(6)
    oracle = Oracle.random(rng, in_channels=2, widths=[5], kernel_sizes=[3], num_classes=3)
    x = rng.standard_normal((2, 2, 7, 7))
    full = gradcam_ref.explain(oracle, x, [0, 1], method="score-cam", variant="tf-keras-vis")
    fast = gradcam_ref.explain(oracle, x, [0, 1], method="score-cam", variant="tf-keras-vis", max_n=2)
    spread = full.activations.reshape(2, 5, -1).std(axis=-1)
    kept = np.zeros(5, dtype=bool)
    kept[np.argsort(-spread, axis=1, kind="stable")[:, :2].ravel()] = True
    np.testing.assert_array_equal(fast.weights, np.where(kept, full.weights, 0.0))
    assert dict(fast.options)["max_n"] == 2
    with pytest.raises(ValueError, match=r"max_n must be an int >= 1 or None \(channels kept per example\), got 0$"):
        gradcam_ref.explain(oracle, x, [0, 1], method="score-cam", max_n=0)


def tf_keras_vis_exact(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """sum(alpha ReLU(g)) / sum(alpha), alpha = 1 / (2 + S g) (0 where g = 0), in exact rational arithmetic (y = 0)."""
    from fractions import Fraction

    out = np.empty(a.shape[:2])
    for n, k in np.ndindex(*a.shape[:2]):
        s = sum(Fraction(float(v)) for v in a[n, k].flat)
        alphas = [(1 / (2 + s * Fraction(float(v))), Fraction(max(float(v), 0.0))) for v in g[n, k].flat if v != 0]
        total = sum(alpha for alpha, _ in alphas)
        out[n, k] = float(sum(alpha * r for alpha, r in alphas) / total) if total else 0.0
    return out


@pytest.mark.parametrize(("s", "g"), [
    (1e300, [1e10, 1e10]),  # S g = 2e310 at every position: every alpha was 0, and so the weight
    (1e300, [1e10, 3e10, -5e9, 0.0]),
    (1e308, [1.0, 2.0, 4.0, 1e-300]),  # the last position's alpha (about 1/2) dominates
    (1e-310, [1.7e308, 1.7e308, 1.7e308, 1e-3]),  # alpha about 1/2: sum alpha ReLU(g) past the largest float
])
def test_tf_keras_vis_plus_plus_where_s_g_overflows(s, g):
    g = np.array([[[g]]])
    a = np.full(g.shape, s / g.size)
    want = tf_keras_vis_exact(a, g)
    assert want[0, 0] != 0
    np.testing.assert_allclose(tf_keras_vis_plus_plus_weights(a, g, np.zeros(1)), want, rtol=1e-14)


def test_tf_keras_vis_plus_plus_in_half_precision_is_the_float32_result_cast():
    """float16: S = 4900, g about 30: S g past 65504 made every alpha 0 and the weight 0."""
    import torch

    rng = np.random.default_rng(0)
    a = torch.full((1, 1, 7, 7), 100.0, dtype=torch.float16)
    g = torch.tensor(np.abs(rng.standard_normal((1, 1, 7, 7))) * 20 + 14, dtype=torch.float16)
    y = torch.zeros(1, dtype=torch.float16)
    got = tf_keras_vis_plus_plus_weights(a, g, y)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, tf_keras_vis_plus_plus_weights(a.float(), g.float(), y.float()).half(), rtol=0, atol=0)
    np.testing.assert_allclose(got.double().numpy(), tf_keras_vis_exact(a.double().numpy(), g.double().numpy()), rtol=1e-3)
