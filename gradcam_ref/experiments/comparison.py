r"""Every CAM method x the metrics of :mod:`gradcam_ref.metrics` on SYNTHETIC lesions with exact masks.

The model is the GAIN experiment's network trained in its ``plain`` mode (:func:`.gain_experiment.train`,
seeded, about a minute on one CPU core; the checkpoint is cached in ``out``). Each method's map of
the true class, upsampled to the image, is scored against the exact lesion mask (and its bounding
box) on the ``unbiased`` test set, re-scored through the JAX backend for the faithfulness metrics
(``score`` returns the log-probabilities :math:`[\log \sigma(-y), \log \sigma(y)]`, so a softmax gives the
model's own sigmoid probabilities), and checked by cascading model parameter randomisation of the
parameter tensors from the top down (:mod:`gradcam_ref.backends.jax.randomise`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref.experiments.gain_experiment import Config, _save_atomically, features, train, two_classes
from gradcam_ref.experiments.lesions import LesionSet, lesion_splits

__all__ = ["lesion_comparison", "mask_boxes"]


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """The bounding boxes ``(N, 4)`` = ``(x0, y0, x1, y1)`` (half-open) of non-empty masks ``(N, H, W)``."""
    boxes = np.empty((masks.shape[0], 4), dtype=np.int64)
    for i, mask in enumerate(masks):
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise ValueError(f"mask {i} is empty: it has no box")
        boxes[i] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


def _plain_model(config: Config, out: Path, log: Callable[[str], None], progress: bool) -> dict[str, np.ndarray]:
    path = out / "checkpoints" / f"plain-{config.key()}.npz"
    if path.exists():
        with np.load(path) as f:
            log(f"plain model: loaded {path}")
            return {k: f[k] for k in f.files}
    sets = lesion_splits(config.seed, {"train": config.train}, size=config.size)
    params = train("plain", sets["train"], config, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(path, params)
    log(f"plain model: trained, saved to {path}")
    return params


def lesion_comparison(methods: Sequence[str], out: str | os.PathLike[str], *, config: Config | None = None,
                      test: int = 200, faithfulness: Sequence[str] = ("deletion", "insertion", "average_drop",
                                                                      "increase_in_confidence", "road_morf",
                                                                      "road_lerf"),
                      steps: int = 20, sanity: bool = True, seed: int = 0, progress: bool = True,
                      log: Callable[[str], None] = print) -> tuple[dict[str, Any], LesionSet]:
    """Score every method in ``methods`` on ``test`` unbiased synthetic lesions.

    Args:
      methods: names from :data:`gradcam_ref.METHODS`.
      out: folder of the cached plain model (``checkpoints/plain-<config key>.npz``).
      config: the GAIN experiment's :class:`.gain_experiment.Config` (default: its defaults).
      test: images of the unbiased test set (the experiment's: the config's seed, drawn apart from training).
      faithfulness: names from :data:`gradcam_ref._evaluate.FAITHFULNESS`.
      steps: deletion/insertion steps.
      sanity: also run cascading randomisation of every parameter tensor, top down.

    Returns:
      ``({method: Evaluation}, the test set)``.
    """
    import jax
    import jax.numpy as jnp

    import gradcam_ref
    from gradcam_ref import _evaluate
    from gradcam_ref.backends import jax as jax_backend
    from gradcam_ref.backends.jax import randomise

    config = config or Config()
    out = Path(out)
    with jax.default_device(jax.devices("cpu")[0]):
        params = _plain_model(config, out, log, progress)  # trained in float32, as in the experiment
    with jax.default_device(jax.devices("cpu")[0]), jax.enable_x64(True):
        data = lesion_splits(config.seed, {"unbiased": test}, size=config.size)["unbiased"]
        p64 = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
        x = jnp.asarray(data.images)
        model = (features, two_classes)
        size = data.images.shape[2:]

        def score(inputs: np.ndarray) -> np.ndarray:
            logits = np.asarray(jax_backend.score(model, inputs, params=p64), dtype=np.float64)
            return -np.logaddexp(0.0, -logits)  # log sigmoid of each column: softmax = the model's sigmoid

        results = {}
        for method in methods:
            log(f"{method}: scoring ...")

            def explain(p: Any, method: str = method) -> np.ndarray:
                # the parameters closed over (Score-CAM's and Ablation-CAM's re-scoring takes no params=)
                bound = (lambda v: features(p, v), lambda a: two_classes(p, a))
                e = gradcam_ref.explain(bound, x, data.labels, method=method, backend="jax")
                return np.asarray(gradcam_ref.upsample(np.asarray(e.maps, dtype=np.float64), size))

            maps = explain(p64)
            results[method] = _evaluate.evaluate(
                maps, masks=data.lesion_masks, boxes=mask_boxes(data.lesion_masks), score=score,
                inputs=data.images, targets=data.labels, faithfulness=faithfulness, steps=steps,
                road_percentages=(10, 30, 50, 70, 90), explain=explain if sanity else None,
                randomised=randomise.randomised(p64, order="cascading", seed=seed) if sanity else None,
                batch_size=64, seed=seed, progress=progress)
            results[method].settings.update({"method": method, "model": "GAIN experiment, plain mode",
                                             "config": dataclasses.asdict(config), "test": test})
    return results, data
