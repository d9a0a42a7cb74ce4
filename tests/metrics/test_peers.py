"""The metrics against the libraries people use, run as they are: Quantus 0.6, pytorch-grad-cam, torchcam.

Each peer runs on a float64 torch model. Quantus casts inputs with ``torch.Tensor(x)`` (float32),
so the model here casts them back and the inputs are float32-representable: no rounding anywhere.
Maps are continuous (no ties), since Quantus sorts with an unstable ``np.argsort`` (with ties its
results depend on the sort's whim, ours do not). Quantus calls ``np.trapz``, removed in NumPy 2:
``quantus_numpy`` gives it, to Quantus's module only, a NumPy with ``trapz``.
"""

from __future__ import annotations

import types

# isort: off
import torchvision  # noqa: F401  (before quantus, which imports tensorflow: the other order segfaults)

# isort: on
import numpy as np
import pytest
import quantus
import quantus.helpers.utils
import torch
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, RemoveMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation
from torchcam.methods import GradCAM as TorchcamGradCAM
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

from gradcam_ref import metrics


class Float64(torch.nn.Module):
    """Runs a float64 network on the float32 tensors Quantus hands it (exact for float32 inputs)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.double())


def network(channels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)).double().eval()


@pytest.fixture
def quantus_numpy(monkeypatch):
    numpy_with_trapz = types.ModuleType("numpy")
    numpy_with_trapz.__dict__.update(np.__dict__)
    numpy_with_trapz.trapz = np.trapezoid
    monkeypatch.setattr(quantus.helpers.utils, "np", numpy_with_trapz)


def data(n: int = 3, channels: int = 3, size: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels, size, size)).astype(np.float32).astype(np.float64)
    return x, rng.random((n, 1, size, size)), rng.random((n, 1, size, size)) > 0.6


def test_localisation_equals_quantus():
    x, a, s = data(n=5)
    y = np.zeros(5, int)
    kw = dict(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s.astype(float))
    maps, masks = a[:, 0], s[:, 0]
    pairs = [
        (quantus.PointingGame(disable_warnings=True), metrics.pointing_game(maps, masks, ties="any")),
        (quantus.RelevanceMassAccuracy(disable_warnings=True), metrics.relevance_mass(maps, masks, positive=False)),
        (quantus.RelevanceRankAccuracy(disable_warnings=True), metrics.relevance_rank(maps, masks)),
        (quantus.TopKIntersection(k=40, disable_warnings=True), metrics.top_k_intersection(maps, masks, k=40)),
        (quantus.AUC(disable_warnings=True), metrics.localisation_auc(maps, masks)),
        (quantus.AttributionLocalisation(disable_warnings=True), metrics.relevance_mass(maps, masks)),
    ]
    for metric, ours in pairs:
        theirs = np.asarray(metric(**kw), dtype=np.float64)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6, err_msg=type(metric).__name__)
        assert np.abs(ours - 0.5).max() < 0.5 or type(metric).__name__ == "PointingGame"


def test_quantus_pointing_game_calls_an_empty_mask_a_hit_we_do_not():
    x, a, s = data(n=2)
    s[1] = False
    theirs = quantus.PointingGame(disable_warnings=True)(model=None, x_batch=x, y_batch=np.zeros(2, int),
                                                          a_batch=a, s_batch=s.astype(float))
    assert theirs[1] is True or theirs[1] == 1  # Quantus: NaN assigned into a boolean array is True
    with pytest.raises(ValueError, match=r"masks of examples \[1\] are empty"):
        metrics.pointing_game(a[:, 0], s[:, 0])


@pytest.mark.parametrize("order, softmax", [("morf", True), ("lerf", False)])
def test_region_perturbation_equals_quantus(order, softmax):
    x, a, _ = data()
    y = np.array([0, 3, 4])
    net = network(3)
    theirs = quantus.RegionPerturbation(patch_size=4, regions_evaluation=10, order=order, disable_warnings=True)(
        model=Float64(net).eval(), x_batch=x, y_batch=y, a_batch=a, device="cpu", softmax=softmax)
    curve = metrics.region_perturbation(metrics.scorer(net), x, a[:, 0], y, patch_size=4, regions=10, order=order,
                                        softmax=softmax)
    np.testing.assert_allclose(np.asarray(theirs), curve.scores[:, :1] - curve.scores[:, 1:], rtol=0, atol=1e-6)


def test_selectivity_equals_quantus(quantus_numpy):
    x, a, _ = data()
    y = np.array([1, 2, 0])
    net = network(3)
    selectivity = quantus.Selectivity(patch_size=4, disable_warnings=True)
    theirs = selectivity(model=Float64(net).eval(), x_batch=x, y_batch=y, a_batch=a, device="cpu")
    curve = metrics.region_perturbation(metrics.scorer(net), x, a[:, 0], y, patch_size=4, regions=16)
    np.testing.assert_allclose(np.asarray(theirs), curve.scores[:, 1:], rtol=0, atol=1e-6)
    assert selectivity.get_auc_score == pytest.approx(np.mean(np.trapezoid(curve.scores[:, 1:], dx=1, axis=1)),
                                                      abs=1e-6)


def test_road_equals_quantus_on_one_channel_and_its_imputation_per_channel():
    x, a, _ = data(channels=1, size=12)
    y = np.array([0, 1, 2])
    net = network(1)
    percentages = [5, 25, 50, 75, 95]
    theirs = quantus.ROAD(noise=0.0, percentages=percentages, disable_warnings=True)(
        model=Float64(net).eval(), x_batch=x, y_batch=y, a_batch=a, device="cpu")
    ours = metrics.road(metrics.scorer(net), x, a[:, 0], y, percentages=percentages, noise=0.0)
    np.testing.assert_array_equal(list(theirs.values()), ours.scores.mean(axis=0))
    # The imputation itself, channel by channel (Quantus's own fails on RGB: it ranks C*H*W entries).
    rng = np.random.default_rng(4)
    image = rng.standard_normal((3, 12, 12))
    removed = rng.random((12, 12)) < 0.4
    indices = np.flatnonzero(removed)
    theirs = np.stack([quantus_imputation(image[c:c + 1], indices, noise=0.0)[0] for c in range(3)])
    np.testing.assert_allclose(metrics.noisy_linear_imputation(image, removed, noise=0.0), theirs, rtol=0, atol=1e-10)
    rgb, maps, _ = data()
    with pytest.raises(IndexError):  # Quantus on RGB, as found
        quantus.ROAD(noise=0.0, percentages=[50], disable_warnings=True)(
            model=Float64(network(3)).eval(), x_batch=rgb, y_batch=y, a_batch=maps, device="cpu")
    assert metrics.road(metrics.scorer(network(3)), rgb, maps[:, 0], y, percentages=[50]).scores.shape == (3, 1)


def test_pytorch_grad_cam_confidence_change_and_road():
    x, a, _ = data(size=12)
    cams = a[:, 0].astype(np.float32).astype(np.float64)
    y = [0, 3, 1]
    net = network(3)
    tensor = torch.from_numpy(x)
    theirs = CamMultImageConfidenceChange()(tensor, cams, [ClassifierOutputSoftmaxTarget(c) for c in y], net)
    ours = metrics.confidence_change(metrics.scorer(net), x, cams, y)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)  # pgc returns float32
    theirs = CamMultImageConfidenceChange()(tensor, cams, [ClassifierOutputTarget(c) for c in y], net)
    np.testing.assert_allclose(theirs, metrics.confidence_change(metrics.scorer(net), x, cams, y, softmax=False),
                               rtol=1e-6, atol=1e-6)
    # ROAD, pgc's convention: at percentile p every pixel whose map value is >= the p-th percentile is imputed.
    for p in (20, 50, 80):
        road = PerturbationConfidenceMetric(RemoveMostRelevantFirst(p, NoisyLinearImputer(noise=0.0)))
        # pgc's imputer needs float32 images: a float32 tensor into the float64 network.
        theirs = road(tensor.float(), cams, [ClassifierOutputSoftmaxTarget(c) for c in y], Float64(net).eval())
        imputed = np.stack([metrics.noisy_linear_imputation(x[i], cams[i] >= np.percentile(cams[i], p), noise=0.0)
                            for i in range(3)])
        score = metrics.scorer(net)
        probabilities = torch.softmax(torch.from_numpy(score(imputed)), 1).numpy()[range(3), y]
        before = torch.softmax(torch.from_numpy(score(x)), 1).numpy()[range(3), y]
        np.testing.assert_allclose(theirs, probabilities - before, rtol=0, atol=2e-6)  # pgc imputes in float32


def _torchcam_maps(net: torch.nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """torchcam's Grad-CAM as its metrics use it: of the score after ``logits_fn`` (here the softmax),
    min-max per sample at the layer, bilinear to the input."""
    extractor = TorchcamGradCAM(net, target_layer="2")
    scores = torch.softmax(net(x), dim=-1)
    cams = extractor.fuse_cams(extractor(classes, scores))
    extractor.remove_hooks()
    up = torch.nn.functional.interpolate(cams.unsqueeze(1), x.shape[2:], mode="bilinear", align_corners=False)
    return up[:, 0].detach().numpy()


def test_torchcam_average_drop_increase_and_deletion_insertion():
    x, _, _ = data(n=4, size=12, seed=7)
    net = network(3, seed=3)
    tensor = torch.from_numpy(x)
    classes = [0, 1, 2, 4]
    maps = _torchcam_maps(net, tensor, classes)
    score = metrics.scorer(net)
    softmax = lambda z: torch.softmax(z, dim=-1)  # noqa: E731

    extractor = TorchcamGradCAM(net, target_layer="2")
    metric = ClassificationMetric(extractor, softmax)
    metric.update(tensor, classes)
    summary = metric.summary()
    extractor.remove_hooks()
    assert summary["avg_drop"] == pytest.approx(metrics.average_drop(score, x, maps, classes, eps=1e-7).mean(),
                                                abs=1e-6)
    assert summary["conf_increase"] == pytest.approx(metrics.increase_in_confidence(score, x, maps, classes).mean(),
                                                     abs=1e-12)

    extractor = TorchcamGradCAM(net, target_layer="2")
    metric = DeletionInsertionMetric(extractor, softmax, steps=20)
    metric.update(tensor, classes)
    summary = metric.summary()
    extractor.remove_hooks()
    deletion = metrics.deletion(score, x, maps, classes, steps=20)
    insertion = metrics.insertion(score, x, maps, classes, steps=20, baseline=0.0)
    assert summary["deletion_auc"] == pytest.approx(deletion.auc.mean(), abs=1e-6)
    assert summary["insertion_auc"] == pytest.approx(insertion.auc.mean(), abs=1e-6)


def test_where_quantus_differs_the_numbers_of_docs_evaluation():
    """The examples of docs/evaluation.md, both ways."""
    # Ties: a 3 x 3 blob of ones on zeros, a 4 x 4 mask overlapping 4 of its pixels (K = 16).
    a = np.zeros((1, 8, 8))
    a[0, 2:5, 2:5] = 1.0
    s = np.zeros((1, 8, 8), bool)
    s[0, 3:7, 3:7] = True
    kw = dict(model=None, x_batch=np.zeros((1, 3, 8, 8)), y_batch=np.zeros(1, int), a_batch=a[:, None],
              s_batch=s[:, None].astype(float))
    theirs = quantus.RelevanceRankAccuracy(disable_warnings=True)(**kw)
    assert theirs[0] == 0.25  # 4 of 16: the 7 zeros it takes are all outside the mask (sort order)
    ours = metrics.relevance_rank(a, s)
    np.testing.assert_allclose(ours, [(4 + 7 * 12 / 55) / 16], rtol=0, atol=1e-15)  # 0.3455: 12 of 55 zeros inside
    assert round(float(ours[0]), 4) == 0.3455
    # An all-zero map is a pointing-game hit for Quantus; for us the mask's share of the tied maxima.
    a = np.zeros((2, 8, 8))
    a[0, 5, 5] = 1.0
    m = np.zeros((2, 8, 8), bool)
    m[:, :4, :4] = True
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=np.zeros((2, 3, 8, 8)), y_batch=np.zeros(2, int), a_batch=a[:, None],
        s_batch=m[:, None].astype(float))
    assert [bool(v) for v in theirs] == [False, True]
    assert metrics.pointing_game(a, m).tolist() == [0.0, 0.25]
