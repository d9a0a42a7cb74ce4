"""The lesion comparison of docs/evaluation.md, on a few images and a briefly trained model."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_ref
from gradcam_ref import metrics
from gradcam_ref.experiments import comparison
from gradcam_ref.experiments.gain_experiment import Config, features, two_classes


def test_mask_boxes_by_hand():
    masks = np.zeros((2, 5, 6), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    np.testing.assert_array_equal(comparison.mask_boxes(masks), [[2, 1, 5, 3], [0, 4, 1, 5]])
    with pytest.raises(ValueError, match="mask 0 is empty"):
        comparison.mask_boxes(np.zeros((1, 3, 3), bool))


@pytest.mark.slow  # a model trained for one epoch, then Grad-CAM and Score-CAM scored: about a minute
def test_lesion_comparison_equals_the_metrics_called_directly(tmp_path):
    config = Config(train=64, test=8, epochs=1, batch=16)
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomised copies with constant maps: NaN with a warning
        results, data = comparison.lesion_comparison(
            ["grad-cam", "score-cam"], tmp_path, config=config, test=6, faithfulness=("deletion", "average_drop"),
            steps=4, progress=False, log=log.append)
    assert (tmp_path / "checkpoints" / f"plain-{config.key()}.npz").exists()
    assert log[0].startswith("plain model: trained")
    assert len(data) == 6 and set(results) == {"grad-cam", "score-cam"}
    values = results["grad-cam"].values
    assert {"pointing_game", "relevance_mass", "weakly_supervised_localisation", "deletion", "average_drop",
            "randomisation/fc.w", "randomisation/c0.b"} <= set(values)
    with np.load(tmp_path / "checkpoints" / f"plain-{config.key()}.npz") as f:
        saved = {k: f[k] for k in f.files}
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in saved.items()}
        e = gradcam_ref.explain((features, two_classes), jnp.asarray(data.images), data.labels, params=params,
                                backend="jax")
        maps = np.asarray(gradcam_ref.upsample(np.asarray(e.maps, dtype=np.float64), (64, 64)))
        live = maps.reshape(6, -1).max(axis=1) > 0
        np.testing.assert_allclose(values["pointing_game"][live],
                                   metrics.pointing_game(maps[live], data.lesion_masks[live]), rtol=0, atol=1e-12)
        logits = np.asarray(e.scores, dtype=np.float64)
        probability = 1 / (1 + np.exp(-logits[np.arange(6), data.labels]))  # the model's own sigmoid
        score = metrics.scorer((features, two_classes), backend="jax", params=params)
        log_sigmoid = lambda x: -np.logaddexp(0.0, -score(x))  # noqa: E731
        np.testing.assert_allclose(np.exp(log_sigmoid(data.images))[np.arange(6), data.labels], probability,
                                   rtol=1e-12)
        deletion = metrics.deletion(log_sigmoid, data.images, maps, data.labels, steps=4).auc
    np.testing.assert_allclose(values["deletion"], deletion, rtol=0, atol=1e-12)
    again, _ = comparison.lesion_comparison(["grad-cam"], tmp_path, config=config, test=6, faithfulness=(),
                                            sanity=False, progress=False, log=log.append)
    assert log[-2].startswith("plain model: loaded")  # the cached model, not a second training
    np.testing.assert_array_equal(again["grad-cam"].values["relevance_mass"], values["relevance_mass"])


@pytest.mark.slow  # 4 images x 5 percentages x 2 orders re-scored by a jitted JAX model: about 40 s loaded
def test_road_on_the_rgb_lesions_through_the_jax_model(tmp_path):
    """ROAD in the comparison: the lesion images are RGB (3, 64, 64) and every channel of the
    removed pixels is imputed (Quantus's ROAD fails on RGB); the values are metrics.road's, re-scored
    through the JAX backend with the model's own sigmoid. An untrained model (init_params, stored
    as the cached plain model) keeps it fast: the metric, not the model, is under test."""
    from gradcam_ref.experiments.gain_experiment import init_params
    from gradcam_ref.experiments.lesions import lesion_splits

    config = Config()
    path = tmp_path / "checkpoints" / f"plain-{config.key()}.npz"
    path.parent.mkdir(parents=True)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in init_params(3).items()}
    np.savez(path, **params)
    percentages = (10, 30, 50, 70, 90)
    results, data = comparison.lesion_comparison(["grad-cam"], tmp_path, test=4, faithfulness=("road_morf", "road_lerf"),
                                                 sanity=False, progress=False, log=lambda _: None)
    assert data.images.shape == (4, 3, 64, 64)
    np.testing.assert_array_equal(data.images, lesion_splits(config.seed, {"unbiased": 4}, size=64)["unbiased"].images)
    values = results["grad-cam"].values
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
        e = gradcam_ref.explain((features, two_classes), jnp.asarray(data.images), data.labels, params=p64,
                                backend="jax")
        maps = np.asarray(gradcam_ref.upsample(np.asarray(e.maps, dtype=np.float64), (64, 64)))
        score = metrics.scorer((features, two_classes), backend="jax", params=p64)
        for order in ("morf", "lerf"):
            curve = metrics.road(score, data.images, maps, data.labels, percentages=percentages, order=order, seed=0)
            np.testing.assert_array_equal(values[f"road_{order}"], curve.scores.mean(axis=1))
            assert set(np.unique(curve.scores)) <= {0.0, 1.0}  # accuracy: the top class is still the label
    removed = np.zeros(64 * 64, bool)
    removed[np.argsort(-maps[0].ravel(), kind="stable")[:64 * 64 * 30 // 100]] = True
    imputed = metrics.noisy_linear_imputation(data.images[0], removed.reshape(64, 64), rng=0)
    changed = imputed != data.images[0]
    np.testing.assert_array_equal(changed.any(axis=0), removed.reshape(64, 64))  # only the removed pixels ...
    assert changed[:, removed.reshape(64, 64)].all()  # ... and in every one of the three channels
