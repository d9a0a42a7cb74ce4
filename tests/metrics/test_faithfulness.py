"""Faithfulness metrics: hand-computed curves on a linear model, identities, the backends' score()."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import metrics
from gradcam_ref.backends import numpy_backend
from gradcam_ref.verify import twins

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 2, 4, 4))  # a linear model: 3 classes, 2 channels, 4 x 4


def linear(x: np.ndarray) -> np.ndarray:
    return np.einsum("kchw,nchw->nk", W, x)


def test_deletion_by_hand():
    x = RNG.standard_normal((1, 2, 4, 4))
    heat = np.arange(16.0)[::-1].reshape(1, 4, 4)  # descending: pixels in raster order
    curve = metrics.deletion(linear, x, heat, 1, steps=4, softmax=False)
    np.testing.assert_array_equal(curve.x, [0, 0.25, 0.5, 0.75, 1])
    contributions = (W[1] * x[0]).sum(axis=0).ravel()  # per pixel, both channels
    expected = [contributions[k:].sum() for k in (0, 4, 8, 12, 16)]
    np.testing.assert_allclose(curve.scores[0], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.auc, [np.trapezoid(expected, [0, .25, .5, .75, 1])], rtol=0, atol=1e-12)
    # Ties go in raster order (a stable sort): an all-zero map deletes row by row, like the ramp.
    flat = metrics.deletion(linear, x, np.zeros((1, 4, 4)), 1, steps=4, softmax=False)
    np.testing.assert_array_equal(flat.scores, curve.scores)


def test_pixels_per_step_follow_risetorchcam_counts():
    x = RNG.standard_normal((1, 2, 4, 4))
    curve = metrics.deletion(linear, x, RNG.random((1, 4, 4)), 0, steps=5, softmax=False)
    np.testing.assert_array_equal(curve.x * 16, [0, 4, 8, 12, 16])  # ceil(16 / 5) = 4 pixels per step
    curve = metrics.deletion(linear, x, RNG.random((1, 4, 4)), 0, steps=6, softmax=False)
    np.testing.assert_array_equal(curve.x * 16, [0, 3, 6, 9, 12, 15, 16])


@given(st.integers(1, 16), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_deletion_plus_insertion_is_constant_for_a_linear_model(steps, batch_size, seed):
    """f(x with the top k set to b) + f(b with the top k set to x) = f(x) + f(b) for linear f; any batch size."""
    rng = np.random.default_rng(seed)
    x, b = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 2, 4, 4))
    heat = rng.integers(0, 3, (2, 4, 4)).astype(float)  # ties
    t = np.array([0, 2])
    d = metrics.deletion(linear, x, heat, t, steps=steps, baseline=b, softmax=False, batch_size=batch_size)
    i = metrics.insertion(linear, x, heat, t, steps=steps, baseline=b, softmax=False, batch_size=batch_size)
    total = linear(x)[[0, 1], t] + linear(b)[[0, 1], t]
    np.testing.assert_allclose(d.scores + i.scores, np.broadcast_to(total[:, None], d.scores.shape), atol=1e-12)
    single = metrics.deletion(linear, x, heat, t, steps=steps, baseline=b, softmax=False, batch_size=1)
    np.testing.assert_array_equal(single.scores, d.scores)


def test_softmax_scores_are_probabilities():
    x = RNG.standard_normal((2, 2, 4, 4))
    curve = metrics.deletion(linear, x, RNG.random((2, 4, 4)), [0, 1], steps=4)
    z = linear(x)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(curve.scores[:, 0], p[[0, 1], [0, 1]], rtol=0, atol=1e-15)
    assert curve.scores[0, -1] == pytest.approx(1 / 3)  # every pixel 0: equal logits


def test_region_perturbation_by_hand():
    x = RNG.standard_normal((1, 2, 4, 4))
    heat = np.zeros((1, 4, 4))
    heat[0, 2:, 2:] = 3.0  # bottom-right patch first, then top-right (2.0), then the rest (ties: raster order)
    heat[0, :2, 2:] = 2.0
    contributions = (W[0] * (x[0] - x[0].min())).sum(axis=0)  # baseline 'min': x -> min(x)
    patches = [contributions[2:, 2:], contributions[:2, 2:], contributions[:2, :2], contributions[2:, :2]]
    f0 = linear(x)[0, 0]
    expected = [f0 - sum(p.sum() for p in patches[:k]) for k in range(5)]
    curve = metrics.region_perturbation(linear, x, heat, 0, patch_size=2, regions=4, softmax=False)
    np.testing.assert_allclose(curve.scores[0], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.aopc(), [np.mean([expected[0] - e for e in expected])], atol=1e-12)
    lerf = metrics.region_perturbation(linear, x, heat, 0, patch_size=2, regions=4, order="lerf", softmax=False)
    order = [patches[2], patches[3], patches[1], patches[0]]  # ascending sums, ties in raster order
    np.testing.assert_allclose(lerf.scores[0], [f0 - sum(p.sum() for p in order[:k]) for k in range(5)], atol=1e-12)


def test_region_perturbation_partial_patches_by_hand():
    """A 10 x 10 map in patches of 8: 64, 16, 16 and 4 pixels. Each example removes its own patches."""
    x = np.ones((2, 1, 10, 10))
    heat = np.zeros((2, 10, 10))
    heat[0, :8, :8] = 1.0  # example 0: the 64-pixel patch first
    heat[1, :8, 8:] = 5.0  # example 1: the 16-pixel patch (rows 0-7, columns 8-9) first
    ones = lambda z: z.sum(axis=(1, 2, 3))[:, None]  # noqa: E731  the pixels still at 1
    curve = metrics.region_perturbation(ones, x, heat, 0, patch_size=8, regions=2, baseline=0.0, softmax=False)
    # Example 0: 64, then the 16-pixel patch at the bottom (ties in raster order: top-right first).
    np.testing.assert_array_equal(curve.scores, [[100, 36, 20], [100, 84, 20]])


@given(st.integers(3, 9), st.integers(3, 9), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_region_perturbation_of_a_batch_is_each_example_alone(h, w, patch_size, n, seed):
    """Partial edge patches rank differently in each example: a batch changes no example's curve."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, h, w))
    heat = rng.random((n, h, w)) ** 4  # a few hot pixels: any patch may come first
    weights = rng.standard_normal((3, 2, h, w))
    score = lambda z: np.einsum("kchw,nchw->nk", weights, z)  # noqa: E731
    regions = -(-h // patch_size) * -(-w // patch_size)
    t = rng.integers(0, 3, n)
    both = metrics.region_perturbation(score, x, heat, t, patch_size=patch_size, regions=regions, softmax=False)
    for i in range(n):
        alone = metrics.region_perturbation(score, x[i:i + 1], heat[i:i + 1], t[i:i + 1], patch_size=patch_size,
                                            regions=regions, softmax=False)
        np.testing.assert_array_equal(both.scores[i], alone.scores[0])


def test_confidence_metrics_by_hand():
    x = RNG.standard_normal((3, 2, 4, 4))
    heat = RNG.random((3, 4, 4))
    t = np.array([0, 1, 2])
    y, o = linear(x)[range(3), t], linear(x * heat[:, None])[range(3), t]
    np.testing.assert_allclose(metrics.confidence_change(linear, x, heat, t, softmax=False), o - y, atol=1e-12)
    p = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    yp, op = p(linear(x))[range(3), t], p(linear(x * heat[:, None]))[range(3), t]
    np.testing.assert_allclose(metrics.average_drop(linear, x, heat, t), np.maximum(yp - op, 0) / yp, atol=1e-15)
    np.testing.assert_array_equal(metrics.increase_in_confidence(linear, x, heat, t), (yp < op).astype(float))
    with pytest.raises(ValueError, match=r"maps must be in \[0, 1\]"):
        metrics.average_drop(linear, x, heat * 2, t)


def test_average_drop_of_a_zero_score_is_nan_with_a_warning():
    """softmax=False with a score of 0: the drop divides by 0 (was NaN with NumPy's RuntimeWarning)."""
    x = np.stack([np.ones((2, 4, 4)), 2 * np.ones((2, 4, 4))])
    heat = np.full((2, 4, 4), 0.5)
    shifted = lambda z: np.stack([z[:, 0, 0, 0] - 1, np.zeros(len(z))], 1)  # noqa: E731  Y = [0, 1], O = [-0.5, 0]
    with pytest.warns(gradcam_ref.MetricWarning, match=r"the score Y_i \+ eps is 0 .* for examples \[0\]"):
        drop = metrics.average_drop(shifted, x, heat, 0, softmax=False)
    np.testing.assert_array_equal(drop, [np.nan, 1.0])  # example 1: max(1 - 0, 0) / 1


def test_noisy_linear_imputation_solves_the_neighbour_equations():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((3, 9, 11))
    removed = rng.random((9, 11)) < 0.6
    out = metrics.noisy_linear_imputation(image, removed, noise=0.0)
    np.testing.assert_array_equal(out[:, ~removed], image[:, ~removed])
    # Every imputed pixel is the weighted mean of its in-image neighbours (weights renormalised).
    for y, x in zip(*np.nonzero(removed), strict=True):
        total, weights = np.zeros(3), 0.0
        for dy, dx, w in metrics._NEIGHBOURS:
            if 0 <= y + dy < 9 and 0 <= x + dx < 11:
                total += w * out[:, y + dy, x + dx]
                weights += w
        np.testing.assert_allclose(out[:, y, x], total / weights, rtol=0, atol=1e-10)
    # A linear ramp is its own imputation away from the border; noise is seeded.
    ramp = np.broadcast_to(np.arange(11.0) * 0.5 + np.arange(9.0)[:, None], (1, 9, 11))
    hole = np.zeros((9, 11), bool)
    hole[2:7, 3:8] = True
    np.testing.assert_allclose(metrics.noisy_linear_imputation(ramp, hole, noise=0.0), ramp, atol=1e-12)
    a = metrics.noisy_linear_imputation(image, removed, rng=5)
    np.testing.assert_array_equal(a, metrics.noisy_linear_imputation(image, removed, rng=5))
    assert np.std(a - out) == pytest.approx(0.01 * np.sqrt(removed.mean()), rel=0.15)
    with pytest.raises(ValueError, match="removed covers every pixel"):
        metrics.noisy_linear_imputation(image, np.ones((9, 11), bool))


def test_road_counts_and_measures():
    x = RNG.standard_normal((2, 2, 4, 4))
    heat = RNG.random((2, 4, 4))
    curve = metrics.road(linear, x, heat, [0, 1], percentages=[0, 25, 50], measure="score", softmax=False,
                         noise=0.0)
    np.testing.assert_allclose(curve.scores[:, 0], linear(x)[[0, 1], [0, 1]], atol=1e-12)
    # 25%: the 4 most relevant pixels imputed from the others.
    order = np.argsort(-heat[0].ravel(), kind="stable")[:4]
    removed = np.zeros(16, bool)
    removed[order] = True
    imputed = metrics.noisy_linear_imputation(x[0], removed.reshape(4, 4), noise=0.0)
    assert curve.scores[0, 1] == pytest.approx(linear(imputed[None])[0, 0], abs=1e-12)
    accuracy = metrics.road(linear, x, heat, [0, 1], percentages=[0, 25, 50], seed=1)
    assert set(np.unique(accuracy.scores)) <= {0.0, 1.0}
    np.testing.assert_array_equal(accuracy.scores, metrics.road(linear, x, heat, [0, 1], percentages=[0, 25, 50],
                                                                seed=1, batch_size=1).scores)


def test_bad_input_is_a_clear_error():
    x, heat = RNG.standard_normal((2, 2, 4, 4)), RNG.random((2, 4, 4))
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, C, \*spatial\) = \(2, C, 4, 4\)"):
        metrics.deletion(linear, x[:1], heat, 0)
    with pytest.raises(ValueError, match=r"targets must be an int or N = 2 class indices"):
        metrics.deletion(linear, x, heat, [0, 1, 2])
    with pytest.raises(ValueError, match=r"targets must be class indices >= 0, got \[-1, 0\]"):
        metrics.deletion(linear, x, heat, [-1, 0])  # not the last class
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\) \(the classes score returns\)"):
        metrics.average_drop(linear, x, heat, [0, 3])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        metrics.deletion(linear, x, heat, 0, batch_size=0)
    for bad in (1.5, True):  # 1.5 put every input in one batch; True read as 1
        with pytest.raises(TypeError, match=f"batch_size must be an int >= 1, got {bad}$"):
            metrics.deletion(linear, x, heat, 0, batch_size=bad)
        with pytest.raises(TypeError, match=f"batch_size must be an int >= 1, got {bad}$"):
            metrics.average_drop(linear, x, heat, 0, batch_size=bad)
    with pytest.raises(TypeError, match="steps must be an int >= 1, got True"):
        metrics.deletion(linear, x, heat, 0, steps=True)
    with pytest.raises(ValueError, match=r"regions \(the patches of a map\) must be an int in \[1, 5\), got 5"):
        metrics.region_perturbation(linear, x, heat, 0, patch_size=2, regions=5)
    with pytest.raises(ValueError, match=r"score must return \(B, classes\)"):
        metrics.deletion(lambda z: linear(z)[:, 0], x, heat, 0)
    with pytest.raises(ValueError, match="baseline must be a number"):
        metrics.insertion(linear, x, heat, 0, baseline="grey")


NAN = float("nan")
BAD_OPTIONS = [
    # flags: a string read as True
    *[(lambda x, h, f=f: f(linear, x, h, 0, softmax="no"), TypeError, "softmax must be True or False, got 'no'")
      for f in (metrics.deletion, metrics.insertion, metrics.road, metrics.average_drop,
                metrics.confidence_change, metrics.increase_in_confidence)],
    (lambda x, h: metrics.region_perturbation(linear, x, h, 0, regions=1, softmax="no"), TypeError,
     "softmax must be True or False, got 'no'"),
    (lambda x, h: metrics.deletion(linear, x, h, 0, progress="no"), TypeError, "progress must be True or False"),
    # numbers: NaN came out without a warning, None was a raw TypeError
    (lambda x, h: metrics.average_drop(linear, x, h, 0, eps=NAN), ValueError, "eps must be a finite number >= 0, got nan"),
    (lambda x, h: metrics.average_drop(linear, x, h, 0, eps=None), TypeError, "eps must be a finite number >= 0, got None"),
    # a NaN baseline or noise was reported as "score returned NaN or Inf"
    (lambda x, h: metrics.deletion(linear, x, h, 0, baseline=None), TypeError,
     r"baseline must be a number, an array or one of 'min', 'mean', 'blur', 'uniform', got None"),
    (lambda x, h: metrics.deletion(linear, x, h, 0, baseline=NAN), ValueError, r"baseline contains NaN or Inf \(1 of 1"),
    (lambda x, h: metrics.insertion(linear, x, h, 0, baseline=np.full(x.shape, np.inf)), ValueError,
     r"baseline contains NaN or Inf \(64 of 64"),
    (lambda x, h: metrics.region_perturbation(linear, x, h, 0, regions=1, baseline=NAN), ValueError,
     "baseline contains NaN"),
    (lambda x, h: metrics.road(linear, x, h, 0, noise=NAN), ValueError, "noise must be a finite number >= 0, got nan"),
    # seeds: NumPy's "expected non-negative integer"
    (lambda x, h: metrics.road(linear, x, h, 0, seed=-1), ValueError, "seed must be an int >= 0 or None, got -1"),
    (lambda x, h: metrics.deletion(linear, x, h, 0, baseline="uniform", seed=-1), ValueError,
     "seed must be an int >= 0 or None, got -1"),
    (lambda x, h: metrics.region_perturbation(linear, x, h, 0, seed=1.5), TypeError,
     "seed must be an int >= 0 or None, got 1.5"),
    # names given an array: NumPy's "truth value of an array ... is ambiguous"
    (lambda x, h: metrics.region_perturbation(linear, x, h, 0, order=np.array(["morf", "lerf"])), ValueError,
     r"order must be 'morf' or 'lerf', got array\(\['morf', 'lerf'\], dtype='<U4'\)$"),
    (lambda x, h: metrics.road(linear, x, h, 0, order=np.array(["morf", "lerf"])), ValueError,
     "order must be 'morf' or 'lerf', got array"),
    (lambda x, h: metrics.road(linear, x, h, 0, measure=np.array(["score", "accuracy"])), ValueError,
     "measure must be 'accuracy' or 'score', got array"),
    # noisy linear imputation
    (lambda x, h: metrics.noisy_linear_imputation(np.where(h[1] == 1, NAN, x[0]), h[1] < 0.75), ValueError,
     r"image contains NaN or Inf \(2 of 32 values\)"),
    (lambda x, h: metrics.noisy_linear_imputation(x[0], h[1] < 0.75, noise=NAN), ValueError,
     "noise must be a finite number >= 0, got nan"),
    (lambda x, h: metrics.noisy_linear_imputation(x[0], h[1] < 0.75, noise=-1.0), ValueError,
     "noise must be a finite number >= 0, got -1.0"),
    (lambda x, h: metrics.noisy_linear_imputation(x[0], h[1] < 0.75, rng=-1), ValueError,
     r"rng must be an int >= 0 or None \(or a numpy.random.Generator\), got -1"),
    (lambda x, h: metrics.noisy_linear_imputation(x[0], h[1] < 0.75, rng="a"), TypeError, "rng must be an int >= 0"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_OPTIONS)
def test_bad_options_are_named(call, error, message):
    x = RNG.standard_normal((2, 2, 4, 4))
    heat = np.linspace(0, 1, 32).reshape(2, 4, 4)  # one pixel of example 1 is 1
    with pytest.raises(error, match=message) as raised:
        call(x, heat)
    assert "\n" not in str(raised.value)


def test_a_patch_larger_than_the_image_is_one_patch():
    """patch_size=2**70 overflowed NumPy's integer division; it is the one patch of patch_size=4."""
    x, heat = RNG.standard_normal((2, 2, 4, 4)), RNG.random((2, 4, 4))
    want = metrics.region_perturbation(linear, x, heat, [0, 1], patch_size=4, regions=1, softmax=False)
    got = metrics.region_perturbation(linear, x, heat, [0, 1], patch_size=2**70, regions=1, softmax=False)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_allclose(want.scores[:, 1], linear(np.broadcast_to(x.min(axis=(1, 2, 3), keepdims=True),
                                                                          x.shape))[[0, 1], [0, 1]], atol=1e-12)


def test_backends_score_the_same_model_alike():
    """numpy oracle, its torch twin and its jax.lax twin give the same float64 curves through scorer()."""
    import jax
    import torch

    oracle = numpy_backend.Oracle.random(np.random.default_rng(2), in_channels=2, widths=[3, 4],
                                         kernel_sizes=[3, 2], num_classes=5, head="gap-mlp")
    x = RNG.standard_normal((2, 2, 8, 8))
    heat = RNG.random((2, 8, 8))
    expected = metrics.deletion(metrics.scorer(oracle), x, heat, [1, 3], steps=8)
    model = twins.torch_oracle(oracle)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = metrics.deletion(metrics.scorer(model), x, heat, [1, 3], steps=8)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-13)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    with jax.enable_x64(True):
        pair = twins.jax_oracle(oracle, layer="relu1")
        got = metrics.deletion(metrics.scorer(pair, backend="jax"), x, heat, [1, 3], steps=8)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-13)


def test_torch_score_converts_warns_and_checks():
    import torch

    from gradcam_ref import TrainingModeWarning
    from gradcam_ref.backends import torch as torch_backend

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    x = np.arange(8.0).reshape(2, 1, 2, 2)
    with pytest.warns(TrainingModeWarning):
        torch_backend.score(model, x)
    model.eval()
    out = torch_backend.score(model, x)
    assert out.dtype == torch.float32 and not out.requires_grad and model[1].weight.grad is None
    expected = x.reshape(2, 4) @ model[1].weight.detach().double().numpy().T + model[1].bias.detach().double().numpy()
    # float32 against float64: within float32 rounding of the largest score (one entry is a
    # cancellation near 0, so a relative tolerance per entry would depend on the BLAS kernel)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match=r"must return scores \(N, classes\) for N = 2 inputs, got shape \(2, 1, 2, 2\)"):
        torch_backend.score(torch.nn.Identity().eval(), x)
