"""``gradcam_ref.evaluate``: every metric of :mod:`gradcam_ref.metrics` that the arguments allow, in one call.

Localisation needs masks or boxes; faithfulness needs a ``score`` (or a model and its backend);
sanity needs an ``explain`` and randomised models. The result is an :class:`Evaluation`: one
``(N,)`` array per metric, a printable table, and JSON written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from gradcam_ref import metrics
from gradcam_ref._files import write_json

__all__ = ["FAITHFULNESS", "LOCALISATION", "Evaluation", "evaluate"]

LOCALISATION = ("pointing_game", "relevance_mass", "relevance_rank", "localisation_auc",
                "weakly_supervised_localisation")
"""The localisation metrics :func:`evaluate` runs when given masks (the last one needs boxes)."""

FAITHFULNESS = ("deletion", "insertion", "region_perturbation_morf", "region_perturbation_lerf",
                "average_drop", "increase_in_confidence", "road_morf", "road_lerf")
"""The faithfulness metrics :func:`evaluate` can run (``faithfulness=``)."""

HIGHER_IS_BETTER = {
    "pointing_game": True, "relevance_mass": True, "relevance_rank": True, "localisation_auc": True,
    "weakly_supervised_localisation": True, "deletion": False, "insertion": True,
    "region_perturbation_morf": True, "region_perturbation_lerf": False, "average_drop": False,
    "increase_in_confidence": True, "road_morf": False, "road_lerf": True,
}


@dataclasses.dataclass
class Evaluation:
    """Per-example values of each metric.

    Attributes:
      values: ``{metric: (N,) float64}``; sanity metrics are named ``randomisation/<layer>``.
      settings: the arguments that define the numbers (steps, baselines, seeds, ...).
    """

    values: dict[str, np.ndarray]
    settings: dict[str, Any]

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean", "std", "n", "undefined"}}`` over examples; NaN (undefined) ones left out."""
        out = {}
        for name, v in self.values.items():
            finite = v[np.isfinite(v)]
            out[name] = {"mean": float(finite.mean()) if finite.size else math.nan,
                         "std": float(finite.std()) if finite.size else math.nan,
                         "n": int(finite.size), "undefined": int(v.size - finite.size)}
        return out

    def table(self) -> str:
        """A plain-text table: metric, mean +- std, examples, which direction is better."""
        rows = [("metric", "mean", "std", "n", "better")]
        for name, s in self.summary().items():
            better = HIGHER_IS_BETTER.get(name.split("/")[0], False)  # randomisation: similarity should fall
            arrow = "higher" if better else "lower"
            n = f"{s['n']}" + (f" ({s['undefined']} NaN)" if s["undefined"] else "")
            rows.append((name, f"{s['mean']:.4f}", f"{s['std']:.4f}", n, arrow))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "summary": self.summary(),
                "values": {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in self.values.items()}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` atomically (complete or absent); its folder is made."""
        write_json(path, self.to_json())


def evaluate(maps: Any, *, masks: Any = None, boxes: Any = None, score: Callable[[np.ndarray], Any] | None = None,
             model: Any = None, backend: str | None = None, inputs: Any = None, targets: Any = None,
             faithfulness: Sequence[str] = ("deletion", "insertion", "average_drop", "increase_in_confidence"),
             steps: int = 100, road_percentages: Sequence[float] = (10, 30, 50, 70, 90),
             explain: Callable[[Any], Any] | None = None, randomised: Iterable[tuple[str, Any]] | None = None,
             sanity_measure: str = "spearman", batch_size: int = 64, seed: int = 0,
             progress: bool = False) -> Evaluation:
    """Score ``maps`` ``(N, *spatial)`` with every metric the arguments allow.

    Args:
      maps: the maps at the input's (and masks') size.
      masks: ``(N, *spatial)`` boolean masks; localisation metrics (:data:`LOCALISATION`) run when
        masks or boxes are given.
      boxes: ``(N, 4)`` boxes ``(x0, y0, x1, y1)``, half-open (they become the masks when none are given).
      score: the re-scoring callable ``inputs -> scores (B, classes)``; with ``inputs`` and
        ``targets`` the ``faithfulness`` metrics run (names from :data:`FAITHFULNESS`). Maps for
        average drop / increase in confidence are min-max normalised per example (Chattopadhay
        et al.'s :math:`x \\odot L`).
      model: instead of ``score``, a model whose backend's ``score`` is used (:func:`metrics.scorer`).
      backend: the model's backend, when it cannot be detected.
      inputs: ``(N, C, *spatial)``, the inputs the maps explain.
      targets: N class indices.
      faithfulness: which faithfulness metrics to run.
      steps: deletion/insertion steps.
      road_percentages: ROAD's percentages.
      explain: ``explain(model) -> maps``, for the model randomisation test (with ``randomised``);
        the reference maps are ``maps``.
      randomised: ``(name, randomised model)`` pairs, e.g.
        ``gradcam_ref.backends.torch.randomise.randomised(model)``.
      sanity_measure: ``'spearman'``, ``'abs-spearman'`` or ``'ssim'``.
      batch_size: inputs per call of ``score``.
      seed: seeds baselines and ROAD's noise.
      progress: tqdm bars on the long metrics.
    """
    m = metrics._maps(maps)
    values: dict[str, np.ndarray] = {}
    settings: dict[str, Any] = {"n": m.shape[0], "shape": list(m.shape[1:])}
    if boxes is not None:
        box = metrics._boxes(boxes, m.shape[1:3] if m.ndim == 3 else None)
        if masks is None:
            masks = metrics.boxes_to_masks(box, m.shape[1:3])
        values["weakly_supervised_localisation"] = metrics.weakly_supervised_localisation(m, box)
    if masks is not None:
        values["pointing_game"] = metrics.pointing_game(m, masks)
        values["relevance_mass"] = metrics.relevance_mass(m, masks)
        values["relevance_rank"] = metrics.relevance_rank(m, masks)
        values["localisation_auc"] = metrics.localisation_auc(m, masks, empty="nan")
    if score is None and model is not None:
        score = metrics.scorer(model, backend=backend)
    unknown = [f for f in faithfulness if f not in FAITHFULNESS]
    if unknown:
        raise ValueError(f"faithfulness must name metrics among {FAITHFULNESS}, got {unknown}")
    if score is not None and inputs is not None and faithfulness:
        if targets is None:
            raise ValueError("targets (N class indices) are needed for the faithfulness metrics")
        common: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
        settings.update({"steps": steps, "road_percentages": list(road_percentages), "seed": seed,
                         "batch_size": batch_size})
        unit = _unit(m)
        for name in faithfulness:
            if name == "deletion":
                values[name] = metrics.deletion(score, inputs, m, targets, steps=steps, seed=seed, **common).auc
            elif name == "insertion":
                values[name] = metrics.insertion(score, inputs, m, targets, steps=steps, seed=seed, **common).auc
            elif name.startswith("region_perturbation"):
                order = name.rsplit("_", 1)[1]
                values[name] = metrics.region_perturbation(score, inputs, m, targets, order=order,
                                                           regions=min(100, _patches(m)), **common).aopc()
            elif name == "average_drop":
                values[name] = metrics.average_drop(score, inputs, unit, targets, batch_size=batch_size)
            elif name == "increase_in_confidence":
                values[name] = metrics.increase_in_confidence(score, inputs, unit, targets, batch_size=batch_size)
            else:
                order = name.rsplit("_", 1)[1]
                values[name] = metrics.road(score, inputs, m, targets, percentages=road_percentages, order=order,
                                            seed=seed, **common).scores.mean(axis=1)
    if explain is not None and randomised is not None:
        settings["sanity_measure"] = sanity_measure
        for layer, v in metrics.model_randomisation(explain, randomised, reference=m, measure=sanity_measure,
                                                    progress=progress).items():
            values[f"randomisation/{layer}"] = v
    if not values:
        raise ValueError("nothing to evaluate: give masks or boxes, and/or score (or model) with inputs and "
                         "targets, and/or explain with randomised models")
    return Evaluation(values, settings)


def _unit(m: np.ndarray) -> np.ndarray:
    """Per-example min-max to [0, 1] (a constant map becomes 0)."""
    flat = m.reshape(m.shape[0], -1)
    low, span = flat.min(axis=1, keepdims=True), np.ptp(flat, axis=1, keepdims=True)
    return ((flat - low) / np.where(span > 0, span, 1.0)).reshape(m.shape)


def _patches(m: np.ndarray, patch_size: int = 8) -> int:
    return int(np.prod([-(-s // patch_size) for s in m.shape[1:]]))
