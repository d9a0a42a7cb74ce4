"""The sanity checks against Quantus 0.6 itself: MPRT (cascading and independent) and RandomLogit.

Quantus runs as installed, on a float64 torch model, with our Grad-CAM as its ``explain_func``;
our side uses only its public settings: ``randomised(..., scheme='quantus')`` for Quantus's
randomisation and ``convention='quantus'`` for how its metrics take the maps. Where Quantus is
wrong (its BatchNorm "randomisation", an all-zero batch aborting the run) both numbers are
asserted, as docs/evaluation.md shows them.
"""

from __future__ import annotations

import copy
import warnings

# isort: off
import torchvision  # noqa: F401  (before quantus, which imports tensorflow: the other order segfaults)

# isort: on
import numpy as np
import pytest
import quantus
import torch

import gradcam_ref
from gradcam_ref import MetricWarning, metrics
from gradcam_ref.backends.torch import randomise
from tests.metrics.test_sanity import net_with_batchnorm


def inputs(n: int = 4, size: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32).astype(np.float64)


def grad_cam(model: torch.nn.Module, x: np.ndarray, targets, layer: str = "3") -> np.ndarray:
    """Grad-CAM at ``layer``, upsampled to the input (Quantus wants maps at the input's size)."""
    e = gradcam_ref.explain(model, torch.from_numpy(np.asarray(x, dtype=np.float64)), np.asarray(targets),
                            layer=layer)
    return np.asarray(gradcam_ref.upsample(e.maps.detach().numpy(), x.shape[2:]))


def quantus_explain(layer: str = "3"):
    def explain_func(model, inputs, targets, **kwargs):
        return grad_cam(model, inputs, targets, layer)

    return explain_func


def quantus_ssim_array(a, b, **kwargs):
    """quantus.ssim as an array: MPRT calls ``.tolist()`` on the result, and ssim returns a list."""
    return np.asarray(quantus.ssim(a, b, **kwargs))


def assert_same_scores(theirs: dict, ours: dict) -> None:
    assert set(theirs) - {"original"} == set(ours)
    for name, values in ours.items():
        np.testing.assert_allclose(np.asarray(theirs[name], dtype=np.float64), values, rtol=0, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("order, layer_order", [("cascading", "top_down"), ("independent", "independent")])
@pytest.mark.parametrize("measure", ["spearman", "ssim"])
def test_mprt_equals_quantus(order, layer_order, measure):
    net = net_with_batchnorm(classes=5, learnt_affine=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_state = torch.get_rng_state()
    x, y = inputs(), np.array([0, 3, 4, 1])
    reference = grad_cam(net, x, y)
    similarity_func = quantus_ssim_array if measure == "ssim" else quantus.similarity_func.correlation_spearman
    theirs = quantus.MPRT(layer_order=layer_order, seed=42, similarity_func=similarity_func, disable_warnings=True)(
        model=net, x_batch=x, y_batch=y, a_batch=reference[:, None], explain_func=quantus_explain(), device="cpu")
    torch.set_rng_state(rng_state)  # Quantus seeds torch's global generator; ours must not move it
    ours = metrics.model_randomisation(
        lambda model: grad_cam(model, x, y), randomise.randomised(net, order=order, seed=42, scheme="quantus"),
        reference=reference, measure=measure, convention="quantus")
    assert list(ours) == ["7", "3", "1", "0"]  # Quantus's layers: the modules with reset_parameters
    assert_same_scores(theirs, ours)
    values = np.concatenate(list(ours.values()))
    assert np.isfinite(values).all() and values.std() > 0.05 and (values < 0.99).all()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("batch_size", [64, 3])
@pytest.mark.parametrize("measure", ["ssim", "spearman"])
def test_random_logit_equals_quantus(batch_size, measure):
    net = net_with_batchnorm(classes=5, learnt_affine=True)
    x, y = inputs(n=5), np.array([0, 3, 4, 1, 4])
    similarity_func = quantus.ssim if measure == "ssim" else quantus.similarity_func.correlation_spearman
    theirs = quantus.RandomLogit(num_classes=5, seed=42, similarity_func=similarity_func, disable_warnings=True)(
        model=net, x_batch=x, y_batch=y, a_batch=None, explain_func=quantus_explain(), device="cpu",
        batch_size=batch_size)
    ours = metrics.random_logit(lambda t: grad_cam(net, x, t), y, 5, seed=42, measure=measure,
                                convention="quantus", batch_size=batch_size)
    np.testing.assert_allclose(np.asarray(theirs, dtype=np.float64), ours, rtol=0, atol=1e-6)
    assert np.isfinite(ours).all() and np.ptp(ours) > 0.05


def test_random_classes_of_quantus_by_hand():
    # Quantus: np.random.seed(seed) per batch, u = randint(0, C - 1), the u-th class that is not the target.
    targets = np.array([0, 3, 4, 1, 4])
    u = np.random.RandomState(42).randint(0, 4, 5)
    expected = [ui + (ui >= t) for ui, t in zip(u, targets, strict=True)]
    np.testing.assert_array_equal(metrics.random_classes(targets, 5, seed=42, convention="quantus"), expected)
    u2 = np.random.RandomState(42).randint(0, 4, 2)
    by_two = metrics.random_classes(targets, 5, seed=42, convention="quantus", batch_size=2)
    np.testing.assert_array_equal(by_two, [u2[0] + (u2[0] >= 0), u2[1] + (u2[1] >= 3),
                                           u2[0] + (u2[0] >= 4), u2[1] + (u2[1] >= 1), u2[0] + (u2[0] >= 4)])
    for convention in ("ours", "quantus"):
        drawn = metrics.random_classes(np.zeros(200, int) + 2, 5, seed=3, convention=convention, batch_size=200)
        assert (drawn != 2).all() and set(drawn.tolist()) == {0, 1, 3, 4}
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 5\)"):
        metrics.random_classes(np.array([5]), 5)
    with pytest.raises(ValueError, match="convention must be 'ours' or 'quantus'"):
        metrics.random_classes(targets, 5, convention="Quantus")


def copy_of(copies, layer: str) -> torch.nn.Module:
    """The randomised model of ``layer``, copied while it is current (the generator reuses one copy)."""
    return next(copy.deepcopy(model) for name, model in copies if name == layer)


def test_quantus_batchnorm_randomisation_is_the_identity_ours_is_random():
    """docs/evaluation.md: BatchNorm under Quantus's reset_parameters, and under our redraw."""
    net = net_with_batchnorm(classes=5, learnt_affine=True)
    quantus_copy = copy_of(randomise.randomised(net, order="independent", seed=42, scheme="quantus"), "1")
    our_copy = copy_of(randomise.randomised(net, order="independent"), "1")
    z = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 6, 5, 5)))
    with torch.no_grad():
        np.testing.assert_allclose(quantus_copy[1](z).numpy(), (z / np.sqrt(1 + 1e-5)).numpy(), rtol=1e-15, atol=0)
        assert not torch.allclose(our_copy[1](z), z, atol=0.1)
    assert torch.equal(our_copy[1].running_var, net[1].running_var)  # ours keeps the learnt statistics
    x, y = inputs(), np.array([0, 3, 4, 1])
    reference = grad_cam(net, x, y)
    theirs = quantus.MPRT(layer_order="independent", seed=42, disable_warnings=True)(
        model=net, x_batch=x, y_batch=y, a_batch=reference[:, None], explain_func=quantus_explain(), device="cpu")
    ours = metrics.model_randomisation(lambda m: grad_cam(m, x, y), [("1", our_copy)], reference=reference)
    assert round(float(np.mean(theirs["1"])), 3) == 0.749  # the numbers of docs/evaluation.md
    assert round(float(np.mean(ours["1"])), 3) == 0.971


def test_one_all_zero_map_aborts_quantus_and_is_nan_for_us():
    """A randomised top layer whose weights for the target are all negative: Grad-CAM after the ReLU
    is all zero. Quantus asserts and stops the whole run; we return NaN for that example and layer."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 32)).double().eval()
    top = copy.deepcopy(net[4])
    torch.manual_seed(43)  # Quantus's seed 42 + 1
    top.reset_parameters()
    dead = np.flatnonzero((top.weight < 0).all(dim=1).numpy())
    assert dead.size  # the classes whose random weights are all negative: 17, 20, 23, 26
    x, y = inputs(n=2), np.array([0, dead[0]])
    reference = grad_cam(net, x, y, layer="1")
    assert (reference.reshape(2, -1).max(axis=1) > 0).all()
    with pytest.raises(AssertionError, match="all equal to zero"):
        quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)(
            model=net, x_batch=x, y_batch=y, a_batch=reference[:, None], explain_func=quantus_explain("1"),
            device="cpu", batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        ours = metrics.model_randomisation(
            lambda m: grad_cam(m, x, y, layer="1"), randomise.randomised(net, seed=42, scheme="quantus"),
            reference=reference, convention="quantus", batch_size=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, MetricWarning)]
    assert messages == [f"{layer}: a map is constant (e.g. all zero), so its ranks carry no order for examples [1]: "
                        "their value is NaN" for layer in ("4", "0")]
    assert np.isfinite(ours["4"][0]) and np.isnan(ours["4"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SciPy's, on the constant row
        both = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)(
            model=net, x_batch=x, y_batch=y, a_batch=reference[:, None], explain_func=quantus_explain("1"),
            device="cpu", batch_size=2)  # with a live map in the batch Quantus runs on: NaN there too
    assert np.isnan(both["4"][1]) and both["4"][0] == pytest.approx(ours["4"][0], abs=1e-6)


def test_quantus_scheme_layers_and_bad_names():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.LayerNorm([4, 2, 2]),
                              torch.nn.Flatten(), torch.nn.Linear(16, 3))
    assert randomise.layers(net, scheme="quantus") == ["0", "2", "4"]
    assert randomise.layers(net) == ["0", "2", "4"]
    with pytest.raises(ValueError, match=r"scheme must be one of \('redraw', 'quantus'\), got 'Quantus'"):
        next(randomise.randomised(net, scheme="Quantus"))
    with pytest.raises(ValueError, match=r"layer '1' has no reset_parameters to randomise"):
        next(randomise.randomised(net, names=["1"], scheme="quantus"))
    with pytest.raises(ValueError, match="convention must be 'ours' or 'quantus'"):
        metrics.model_randomisation(lambda m: np.ones((1, 8, 8)), [], reference=np.ones((1, 8, 8)), convention="q")
