"""Sanity checks: similarity measures, randomised copies (torch, JAX), the randomisation and random-logit tests."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

import gradcam_ref
from gradcam_ref import MetricWarning, metrics
from gradcam_ref.backends.jax import randomise as jax_randomise
from gradcam_ref.backends.torch import randomise as torch_randomise


def test_similarity_against_scipy_and_scikit_image():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, (3, 9, 9)).astype(float), rng.random((3, 9, 9))
    expected = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(metrics.similarity(a, b), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.similarity(a, -b, measure="abs-spearman"), np.abs(expected), atol=1e-12)
    expected = [structural_similarity(x, y, data_range=max(x.max(), y.max()) - min(x.min(), y.min()))
                for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(metrics.similarity(a, b, measure="ssim"), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.similarity(a, a, measure="ssim"), 1.0, atol=1e-12)


def test_an_all_zero_map_is_a_value_not_a_crash():
    rng = np.random.default_rng(1)
    a = rng.random((3, 8, 8))
    b = a.copy()
    b[1] = 0.0
    with pytest.warns(MetricWarning, match=r"constant \(e.g. all zero\).* examples \[1\]"):
        rho = metrics.similarity(a, b)
    assert np.isnan(rho[1]) and rho[0] == pytest.approx(1.0) and rho[2] == pytest.approx(1.0)
    ssim = metrics.similarity(a, b, measure="ssim")
    assert np.isfinite(ssim).all() and ssim[1] < 0.1  # SSIM of a map and zeros: defined, near 0
    zeros = np.zeros((1, 8, 8))
    assert metrics.similarity(zeros, zeros, measure="ssim").tolist() == [1.0]


def net_with_batchnorm(classes: int = 4, learnt_affine: bool = False) -> torch.nn.Module:
    """A float64 network whose BatchNorm has learnt-looking statistics (and weights, with ``learnt_affine``)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, classes)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        if learnt_affine:
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_torch_randomised_copies_leave_the_model_as_it_was():
    model = net_with_batchnorm()
    model[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch_randomise.layers(model) == ["0", "1", "3", "7"]  # ReLU, pooling, Flatten: no parameters
    cascade = list(torch_randomise.randomised(model, order="cascading"))
    # The cascading copy is one copy, changed between yields: compare it at the end (all layers random).
    independent = [(name, {k: v.clone() for k, v in m.state_dict().items()})
                   for name, m in torch_randomise.randomised(model, order="independent")]
    assert [name for name, _ in cascade] == ["7", "3", "1", "0"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and not model[0].weight.requires_grad and model[0].weight.grad is None
    for name, copied in independent:
        changed = {k.split(".")[0] for k in state if not torch.equal(copied[k], state[k])}
        assert changed == {name}, (name, changed)
        assert torch.equal(copied["1.running_mean"], state["1.running_mean"])  # buffers are kept
    bn = dict(independent)["1"]
    assert not torch.equal(bn["1.weight"], torch.ones(6, dtype=torch.float64))  # not the identity
    again = dict((n, {k: v.clone() for k, v in m.state_dict().items()})
                 for n, m in torch_randomise.randomised(model, order="independent"))
    assert all(torch.equal(again["3"][k], dict(independent)["3"][k]) for k in state)  # seeded
    with pytest.raises(ValueError, match=r"layer '2' has no parameters of its own"):
        next(torch_randomise.randomised(model, names=["2"]))


def test_model_randomisation_on_torch():
    model = net_with_batchnorm()
    x = np.random.default_rng(2).standard_normal((2, 3, 12, 12))
    targets = np.array([0, 2])

    def explain(m):
        return gradcam_ref.explain(m, torch.from_numpy(x), targets, layer="3").maps.detach().numpy()

    reference = explain(model)
    same = metrics.model_randomisation(explain, [("none", model)], reference=reference)
    np.testing.assert_allclose(same["none"], 1.0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero gradients, constant maps: reported, tested below
        scores = metrics.model_randomisation(explain, torch_randomise.randomised(model), reference=reference)
    assert list(scores) == ["7", "3", "1", "0"]
    assert all(v.shape == (2,) for v in scores.values())
    finite = np.concatenate([v[np.isfinite(v)] for v in scores.values()])
    assert finite.size and (finite < 0.999).all()  # randomising any layer changes the maps
    ssim = metrics.model_randomisation(explain, torch_randomise.randomised(model, order="independent"),
                                       reference=reference, measure="ssim")
    assert all(np.isfinite(v).all() for v in ssim.values())


def test_model_randomisation_reports_an_all_zero_map_by_name():
    rng = np.random.default_rng(3)
    reference = rng.random((2, 8, 8))
    models = [("top", 1.0), ("dead", 0.0)]
    with pytest.warns(MetricWarning, match=r"dead: a map is constant"):
        scores = metrics.model_randomisation(lambda s: reference * s, models, reference=reference)
    assert scores["top"].tolist() == pytest.approx([1.0, 1.0]) and np.isnan(scores["dead"]).all()


def jax_model(params):
    def features(x):
        y = jax.lax.conv_general_dilated(x, params["conv"]["w"], (1, 1), "SAME") + params["conv"]["b"][:, None, None]
        return jax.nn.relu(y)

    def head(a):
        return a.mean(axis=(2, 3)) @ params["dense"]["w"] + params["dense"]["b"]

    return features, head


def test_jax_randomised_params_and_model_randomisation():
    with jax.enable_x64(True):
        key = jax.random.key(0)
        params = {"conv": {"w": jax.random.normal(key, (5, 3, 3, 3)), "b": jnp.zeros(5)},
                  "dense": {"w": jax.random.normal(jax.random.key(1), (5, 4)), "b": jnp.zeros(4)}}
        original = jax.tree_util.tree_map(np.asarray, params)
        cascade = list(jax_randomise.randomised(params))
        assert [name for name, _ in cascade] == ["dense", "conv"]
        assert not np.array_equal(cascade[1][1]["dense"]["w"], original["dense"]["w"])
        assert not np.array_equal(cascade[1][1]["conv"]["b"], original["conv"]["b"])  # constant: std 1
        independent = dict(jax_randomise.randomised(params, order="independent"))
        np.testing.assert_array_equal(independent["conv"]["dense"]["w"], original["dense"]["w"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, original)  # untouched
        x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 10, 10)))

        def explain(p):
            return np.asarray(gradcam_ref.explain(jax_model(p), x, np.array([1, 3])).maps)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = metrics.model_randomisation(explain, cascade, reference=explain(params))
        assert list(scores) == ["dense", "conv"]
        finite = np.concatenate([v[np.isfinite(v)] for v in scores.values()])
        assert finite.size and (finite < 0.999).all()


def test_random_logit():
    rng = np.random.default_rng(5)
    table = rng.random((10, 8, 8))  # one map per class, the same for every example

    def explain(targets):
        return table[np.asarray(targets)]

    targets = np.array([0, 3, 9])
    values = metrics.random_logit(explain, targets, 10, seed=1)
    other = (targets + np.random.default_rng(1).integers(1, 10, size=3)) % 10
    assert (other != targets).all()
    np.testing.assert_allclose(values, metrics.similarity(table[targets], table[other], measure="ssim"), atol=0)
    np.testing.assert_array_equal(values, metrics.random_logit(explain, targets, 10, seed=1))
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        metrics.random_logit(explain, targets, 1)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda t: metrics.random_classes(t, float("inf")), TypeError, "num_classes must be an int >= 2, got inf"),  # OverflowError
    (lambda t: metrics.random_classes(t, None), TypeError, "num_classes must be an int >= 2, got None"),
    (lambda t: metrics.random_classes(t, 1), ValueError, "num_classes must be an int >= 2, got 1"),
    (lambda t: metrics.random_classes(t, np.array([3, 4])), TypeError, r"num_classes must be an int >= 2, got array"),
    (lambda t: metrics.random_logit(lambda _: np.ones((2, 4, 4)), t, 2.5), TypeError,
     "num_classes must be an int >= 2, got 2.5"),
    (lambda t: metrics.random_classes(t, 3, seed=-1), ValueError, "seed must be an int >= 0 or None, got -1"),  # NumPy's
    (lambda t: metrics.random_classes(t, 3, seed=2**32, convention="quantus"), ValueError,
     r"seed must be an int in \[0, 4294967296\) or None, got 4294967296"),
    (lambda t: metrics.random_classes(t, 3, convention=np.array(["ours", "quantus"])), ValueError,
     r"convention must be 'ours' or 'quantus', got array\(\['ours', 'quantus'\], dtype='<U7'\)$"),
    (lambda t: metrics.similarity(np.ones((2, 4, 4)), np.ones((2, 4, 4)), measure=np.array(["ssim", "spearman"])),
     ValueError, r"measure must be one of \('spearman', 'abs-spearman', 'ssim'\), got array\("),
])
def test_bad_options_are_named(call, error, message):
    with pytest.raises(error, match=message) as raised:
        call(np.array([0, 1]))
    assert "\n" not in str(raised.value)
