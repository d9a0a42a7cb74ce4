"""gradcam_ref.metrics against Quantus 0.6, in the same run.

- ``localisation``: time per 224 x 224 map (a batch of 8 Grad-CAM-like maps, 40% exact zeros) of
  each localisation metric, ours and Quantus's (called on the same arrays; no model).
- ``perturbation``: deletion (``steps`` + 1 re-scorings per image) and region perturbation on
  EfficientNet-Lite0 at 224 x 224, batch 1, as a ratio to (their number of forwards x one batch-1
  no-grad forward) timed in the same rounds; Quantus's RegionPerturbation beside ours.
- ``mprt``: model parameter randomisation (cascading and independent) of ResNet-18 (torchvision, 112 x 112,
  batch 4, every one of its L = 41 layers) with Grad-CAM of ``layer4``, ours and Quantus's MPRT with
  the same Grad-CAM as its ``explain_func``, as a ratio to L + 1 plain ``gradcam_ref.explain`` calls
  timed in the same rounds (the goal: MPRT <= L + 1 explanations, each at explain's cost).
- ``imputation``: ROAD's noisy linear imputation of a 3 x 224 x 224 image with 50% of its pixels
  removed, ours (all channels, one factorisation) against Quantus's (called once per channel: on RGB
  its own ROAD fails), ratio to ours.
"""

from __future__ import annotations

import math
import os
import time
import types
from typing import Any

import numpy as np

from benchmarks import report
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
                         "ms_per_map": 1e3 * r["seconds"] / n,
                         "cpu_ms_per_map": 1e3 * _cpu_seconds(methods[library], rounds) / n,
                         "load_average": os.getloadavg(), **r})
    return rows


def _cpu_seconds(fn: Any, rounds: int) -> float:
    """The median thread CPU time of one call: what the call costs, whatever else the cores run."""
    times = []
    for _ in range(max(3, rounds // 3)):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return float(np.median(times))


def mprt(rounds: int, size: int = 112) -> list[dict]:
    import quantus
    import torch
    import torchvision

    import gradcam_ref
    from gradcam_ref.backends.torch import randomise

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    tensor, y = torch.from_numpy(x), np.array([3, 1, 4, 1])  # a batch of 4: Quantus aborts on one all-zero batch
    layers = randomise.layers(model)

    def maps_of(m: Any, inputs: np.ndarray = x, targets: np.ndarray = y) -> np.ndarray:
        maps = gradcam_ref.explain(m, torch.from_numpy(np.asarray(inputs)), np.asarray(targets),
                                   layer="layer4").maps.detach().numpy()
        return np.asarray(gradcam_ref.upsample(maps, (size, size)))  # Quantus wants maps at the input's size

    def explains() -> None:
        for _ in range(len(layers) + 1):
            gradcam_ref.upsample(gradcam_ref.explain(model, tensor, y, layer="layer4").maps.detach().numpy(),
                                 (size, size))

    def ours(order: str, scheme: str = "redraw") -> Any:
        def run() -> None:
            metrics.model_randomisation(maps_of, randomise.randomised(model, order=order, scheme=scheme, seed=42),
                                        reference=maps_of(model))
        return run

    def theirs(order: str) -> Any:
        metric = quantus.MPRT(layer_order=order, seed=42, disable_warnings=True)
        explain_func = lambda model, inputs, targets, **kw: maps_of(model, inputs, targets)  # noqa: E731

        def run() -> None:
            metric(model=model, x_batch=x, y_batch=y, a_batch=maps_of(model), explain_func=explain_func,
                   device="cpu")
        return run

    baseline = f"{len(layers) + 1} explains"
    methods = {baseline: explains,
               "gradcam_ref cascading": ours("cascading"), "gradcam_ref independent": ours("independent"),
               "gradcam_ref cascading (quantus scheme)": ours("cascading", "quantus"),
               "quantus MPRT top_down": theirs("top_down"), "quantus MPRT independent": theirs("independent")}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random copies whose Grad-CAM is constant: NaN with a warning
        result = paired_ratios(methods, baseline, rounds=rounds, warmup=1)
    return [{"suite": "metrics", "kind": "mprt", "method": name, "library": name.split()[0],
             "explanations": len(layers) + 1, "load_average": os.getloadavg(), **r} for name, r in result.items()]


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


KINDS = ("localisation", "imputation", "mprt", "perturbation")
"""The parts of the suite, in the order :func:`run` runs them."""

LOCALISATION_GOAL_MS = 5.0
"""Issue 17's goal: each localisation metric (NumPy) at most 5 ms per 224 x 224 map."""


def run(quick: bool = False, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """Rows ``{"suite": "metrics", "kind", "method", "library", "ratio", "seconds", ...}``."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds must be among {KINDS}, got {unknown}")
    _give_quantus_trapz()
    rounds = {"localisation": (5, 15), "imputation": (3, 7), "mprt": (2, 5), "perturbation": (3, 7)}
    parts = {"localisation": localisation, "imputation": imputation, "mprt": mprt, "perturbation": perturbation}
    rows: list[dict] = []
    for kind in KINDS:
        if kind in kinds:
            rows += parts[kind](rounds=rounds[kind][0 if quick else 1])
    return rows


def localisation_goals(rows: list[dict], limit_ms: float = LOCALISATION_GOAL_MS) -> list[dict]:
    """Our localisation rows against the goal, in wall time (what a user waits: the load's share
    included) and in thread CPU time (what the call costs), with the load average beside them."""
    out = []
    for r in rows:
        if r["suite"] == "metrics" and r["kind"] == "localisation" and r["library"] == "gradcam_ref":
            out.append({"method": r["method"], "wall_ms": r["ms_per_map"], "cpu_ms": r.get("cpu_ms_per_map"),
                        "limit_ms": limit_ms, "met_wall": r["ms_per_map"] <= limit_ms,
                        "met_cpu": r.get("cpu_ms_per_map", math.inf) <= limit_ms,
                        "load_average": r.get("load_average")})
    return out


def localisation_goals_text(rows: list[dict]) -> str:
    """One line per localisation metric: ``localisation_auc | wall 1.30 ms <= 5 ms, met | CPU ... | load ...``."""
    lines = []
    for g in localisation_goals(rows):
        cpu = "n/a" if g["cpu_ms"] is None else (
            f"{g['cpu_ms']:.2f} ms {'<=' if g['met_cpu'] else '>'} {g['limit_ms']:g} ms, "
            f"{'met' if g['met_cpu'] else 'MISSED'}")
        load = "n/a" if g["load_average"] is None else ", ".join(f"{v:.1f}" for v in g["load_average"])
        lines.append(f"{g['method']} per 224 x 224 map | wall {g['wall_ms']:.2f} ms "
                     f"{'<=' if g['met_wall'] else '>'} {g['limit_ms']:g} ms, {'met' if g['met_wall'] else 'MISSED'} "
                     f"| CPU {cpu} | load {load}")
    return "\n".join(lines)


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
            when = f"{r['ms_per_map']:.2f} ms per map (wall"
            if "cpu_ms_per_map" in r:
                when += f"; {r['cpu_ms_per_map']:.2f} ms CPU"
            if "load_average" in r:
                when += f"; load {r['load_average'][0]:.1f}"
            when += ")"
        else:
            when = f"{r['seconds']:.3f} s"
        if r["kind"] == "localisation" and not any(o["kind"] == "localisation" and o["method"] == r["method"]
                                                    and o["library"] == "quantus" for o in chosen):
            lines.append(f"| {r['kind']} | {r['method']} ({r['library']}) | {when} | - (Quantus has none) |")
            continue
        base = {"localisation": "to Quantus", "perturbation": "to the forwards", "imputation": "to ours",
                "mprt": f"to {r.get('explanations')} explains"}[r["kind"]]
        lines.append(f"| {r['kind']} | {r['method']} ({r['library']}) | {when} | "
                     f"{r['ratio']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) {base} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_metrics [--kinds localisation] [--full] [--json FILE]``: the rows'
    table, then the localisation goal in wall and CPU time with the load average."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    parser.add_argument("--full", action="store_true", help="the full run's rounds (default: --quick's)")
    parser.add_argument("--json", metavar="FILE", type=report.writable, help="also write the rows here")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"--kinds takes comma-separated names among {', '.join(KINDS)}; got {args.kinds!r}")
    rows = run(quick=not args.full, kinds=kinds)
    print(table(rows))
    if "localisation" in kinds:
        print(f"\ngoal: localisation <= {LOCALISATION_GOAL_MS:g} ms per 224 x 224 map (NumPy, one thread)")
        print(localisation_goals_text(rows))
    if args.json:
        report.save(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    from benchmarks.run import set_threads

    set_threads(1)  # one thread, as in `python -m benchmarks.run` (before NumPy's BLAS and torch start)
    import torchvision  # noqa: F401  (before quantus's tensorflow)

    raise SystemExit(main())
