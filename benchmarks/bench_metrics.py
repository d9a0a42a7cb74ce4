"""gradcam_ref.metrics against Quantus 0.6, in the same run.

- ``localisation``: time per 224 x 224 map (a batch of 8 Grad-CAM-like maps, 40% exact zeros) of
  each localisation metric, ours and Quantus's (called on the same arrays; no model).
- ``perturbation``: deletion (``steps`` + 1 re-scorings per image) and region perturbation on
  EfficientNet-Lite0 at 224 x 224, batch 1, as a ratio to (their number of forwards x one batch-1
  no-grad forward) timed in the same rounds; Quantus's RegionPerturbation beside ours.
- ``imputation``: ROAD's noisy linear imputation of a 3 x 224 x 224 image with 50% of its pixels
  removed, ours (all channels, one factorisation) against Quantus's (called once per channel: on RGB
  its own ROAD fails), ratio to ours.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from benchmarks.timing import paired_ratios
from gradcam_ref import metrics


def _maps(n: int = 8, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    coarse = np.maximum(rng.standard_normal((n, 7, 7)) - 0.5, 0)  # ReLU: many exact zeros, upsampled
    maps = ndimage.zoom(coarse, (1, size / 7, size / 7), order=1)
    masks = np.zeros((n, size, size), bool)
    masks[:, 40:160, 60:200] = True
    return maps, masks


def localisation(rounds: int) -> list[dict]:
    import quantus

    maps, masks = _maps()
    n = maps.shape[0]
    x = np.zeros((n, 3, *maps.shape[1:]))
    a, s = maps[:, None], masks[:, None].astype(float)
    kw = dict(model=None, x_batch=x, y_batch=np.zeros(n, int), a_batch=a, s_batch=s)
    pairs = {
        "pointing_game": (lambda: metrics.pointing_game(maps, masks), quantus.PointingGame(disable_warnings=True)),
        "relevance_mass": (lambda: metrics.relevance_mass(maps, masks),
                           quantus.RelevanceMassAccuracy(disable_warnings=True)),
        "relevance_rank": (lambda: metrics.relevance_rank(maps, masks),
                           quantus.RelevanceRankAccuracy(disable_warnings=True)),
        "top_k_intersection": (lambda: metrics.top_k_intersection(maps, masks),
                               quantus.TopKIntersection(disable_warnings=True)),
        "localisation_auc": (lambda: metrics.localisation_auc(maps, masks), quantus.AUC(disable_warnings=True)),
        "weakly_supervised_localisation": (
            lambda: metrics.weakly_supervised_localisation(maps, np.array([[60, 40, 200, 160]] * n)), None),
    }
    rows = []
    for name, (ours, theirs) in pairs.items():
        methods: dict[str, Any] = {"gradcam_ref": ours}
        if theirs is not None:
            methods["quantus"] = lambda theirs=theirs: theirs(**kw)
        result = paired_ratios(methods, "quantus" if theirs is not None else "gradcam_ref", rounds=rounds)
        for library, r in result.items():
            rows.append({"suite": "metrics", "kind": "localisation", "method": name, "library": library,
                         "ms_per_map": 1e3 * r["seconds"] / n, **r})
    return rows


def perturbation(rounds: int, steps: int = 20) -> list[dict]:
    import quantus
    import torch

    from gradcam_ref.zoo import efficientnet_lite0

    model = efficientnet_lite0.load_torch().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    heat = _maps(1)[0]
    tensor = torch.from_numpy(x)
    score = metrics.scorer(model, backend="torch")
    t = int(score(x).argmax())
    regions = steps
    forwards = steps + 1

    def forward() -> None:
        with torch.no_grad():
            model(tensor)

    def n_forwards() -> None:
        for _ in range(forwards):
            forward()

    region = quantus.RegionPerturbation(patch_size=16, regions_evaluation=regions, disable_warnings=True)
    methods = {
        f"{forwards} forwards": n_forwards,
        "gradcam_ref deletion": lambda: metrics.deletion(score, x, heat, t, steps=steps, batch_size=1),
        "gradcam_ref deletion batch 8": lambda: metrics.deletion(score, x, heat, t, steps=steps, batch_size=8),
        "gradcam_ref region_perturbation": lambda: metrics.region_perturbation(
            score, x, heat, t, patch_size=16, regions=regions, batch_size=1),
        "quantus RegionPerturbation": lambda: region(model=model, x_batch=x, y_batch=np.array([t]),
                                                     a_batch=heat[:, None], device="cpu", batch_size=1),
    }
    result = paired_ratios(methods, f"{forwards} forwards", rounds=rounds, warmup=1)
    return [{"suite": "metrics", "kind": "perturbation", "method": name, "library": name.split()[0],
             "forwards": forwards, **r} for name, r in result.items()]


def imputation(rounds: int) -> list[dict]:
    from quantus.functions.perturb_func import noisy_linear_imputation as theirs

    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 224, 224))
    removed = np.zeros(224 * 224, bool)
    removed[np.argsort(-_maps(1)[0].ravel(), kind="stable")[:224 * 112]] = True
    indices = np.flatnonzero(removed)
    mask = removed.reshape(224, 224)
    methods = {
        "gradcam_ref": lambda: metrics.noisy_linear_imputation(image, mask, rng=0),
        "quantus (per channel)": lambda: [theirs(image[c:c + 1], indices) for c in range(3)],
    }
    result = paired_ratios(methods, "gradcam_ref", rounds=rounds, warmup=1)
    return [{"suite": "metrics", "kind": "imputation", "method": name, "library": name.split()[0], **r}
            for name, r in result.items()]


def run(quick: bool = False) -> list[dict]:
    """Rows ``{"suite": "metrics", "kind", "method", "library", "ratio", "seconds", ...}``."""
    _give_quantus_trapz()
    rows = localisation(rounds=5 if quick else 15)
    rows += imputation(rounds=3 if quick else 7)
    rows += perturbation(rounds=3 if quick else 7)
    return rows


def _give_quantus_trapz() -> None:
    """Quantus calls np.trapz (gone in NumPy 2): give its helpers module a NumPy with it."""
    import quantus.helpers.utils

    proxy = types.ModuleType("numpy")
    proxy.__dict__.update(np.__dict__)
    proxy.trapz = np.trapezoid  # type: ignore[attr-defined]
    quantus.helpers.utils.np = proxy  # type: ignore[attr-defined]


def table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "metrics"]
    lines = ["| kind | method | time | ratio (q1-q3) |", "|---|---|---|---|"]
    for r in chosen:
        if r["kind"] == "localisation":
            when = f"{r['ms_per_map']:.2f} ms per map"
        else:
            when = f"{r['seconds']:.3f} s"
        base = {"localisation": "to Quantus", "perturbation": "to the forwards", "imputation": "to ours"}[r["kind"]]
        lines.append(f"| {r['kind']} | {r['method']} ({r['library']}) | {when} | "
                     f"{r['ratio']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) {base} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import torchvision  # noqa: F401  (before quantus's tensorflow)

    print(table(run(quick=True)))
