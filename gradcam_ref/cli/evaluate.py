"""``gradcam-ref evaluate``: localisation, faithfulness and sanity metrics of CAM methods on a torch model.

Two sources of examples:

- ``--demo``: the demo's photos (scikit-image's chelsea, coffee, stereo_motorcycle and rocket) as a
  2 x 2 collage of 224 x 224 tiles; each photo's class is the network's top-1 on the photo alone,
  and its tile is the ground-truth box. Localisation example i is (the collage, class of photo i,
  tile i); faithfulness and sanity examples are the photos alone (on the collage the class's
  probability is tiny for every input, and masking the other tiles only raises it).
- ``IMAGE... --boxes FILE.json``: one box per image, ``{"name.jpg": [x0, y0, x1, y1], ...}`` in the
  image's own pixels (scaled to the model's input size); classes by ``--target``.

- ``--lesions``: SYNTHETIC lesions with exact masks (:mod:`gradcam_ref.experiments.comparison`): the GAIN
  experiment's network trained in its plain mode (JAX, seeded, cached in ``--out``), every method's
  map of the true class against the lesion mask and its box, faithfulness re-scored through the
  JAX backend, and (``--sanity``) cascading randomisation of its parameter tensors.

For each method (``--methods``: names of ``gradcam_ref.METHODS``, ``all``, or the aliases ``gradcam``
and ``gradcam++``) the maps are upsampled to the input (half-pixel bilinear) and scored;
a table (metric x method, means over examples) is printed and ``--json`` gets every per-example value,
written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref._files import write_json
from gradcam_ref._methods import METHODS as _METHODS
from gradcam_ref.cli._common import (
    UsageError,
    check_output,
    class_names,
    import_torch_cli,
    load_image,
    model_inputs,
    parse_target,
    preprocess,
)

ALIASES = {"gradcam": "grad-cam", "gradcam++": "grad-cam++"}
"""The names this command took before it knew every method, kept (they name the table's columns)."""
METHODS = (*ALIASES, *_METHODS)
DEMO = (("chelsea", "chelsea"), ("coffee", "coffee"), ("motorcycle", "stereo_motorcycle"), ("rocket", "rocket"))
"""The photos of the comparison: the demo's, with rocket for astronaut (ImageNet has no person class)."""


def run(args: argparse.Namespace) -> int:
    from gradcam_ref import _evaluate
    from gradcam_ref.zoo import efficientnet_lite0 as zoo

    start = time.perf_counter()
    if args.json:  # written after every metric ran: refused now if it cannot be
        check_output("--json", args.json, folder=False)
    if args.lesions:  # the model's cache
        check_output("--out", args.out, folder=True)
    load = os.getloadavg()  # recorded in --json beside the elapsed time: on a shared machine it explains it
    methods = _METHODS if args.methods == "all" else _names(args.methods, METHODS, "--methods")
    faithfulness = _names(args.faithfulness, _evaluate.FAITHFULNESS, "--faithfulness") if args.faithfulness else ()
    if args.lesions:
        return _lesions(args, methods, faithfulness, start, load)
    torch_cli = import_torch_cli()
    size, mean, std = model_inputs(args)
    loaded = torch_cli.load(args.model, weights=args.weights, layer=args.layer, call=args.call, device=args.device)
    if args.demo:
        batch, boxes, targets, labels, alone = _demo(torch_cli, loaded, size, mean, std)
    else:
        if not args.images or not args.boxes:
            raise UsageError("give --demo, or IMAGE... with --boxes FILE.json")
        batch, boxes, targets, labels = _images(torch_cli, loaded, args, size, mean, std)
        alone = batch
    names = class_names() if args.model == zoo.MODEL_NAME else None
    print(f"{len(targets)} examples, input {batch.shape[2]} x {batch.shape[3]}, model {args.model}, {loaded.where}")
    for label, c, box in zip(labels, targets, boxes, strict=True):
        print(f"  {label}: class {names[c] if names else c}, box {box.tolist()}")

    e = torch_cli.explain(loaded, batch, targets)
    e_alone = e if alone is batch else torch_cli.explain(loaded, alone, targets)
    results: dict[str, Any] = {}
    score = None if not faithfulness else _scorer(loaded)
    for method in methods:
        print(f"\n{method}: scoring ...", flush=True)
        if ALIASES.get(method, method) not in ("grad-cam", "grad-cam++"):  # its own capture
            e = _explain(torch_cli, loaded, batch, targets, ALIASES.get(method, method), args.batch_size)
            e_alone = e if alone is batch else torch_cli.explain(loaded, alone, targets,
                                                                  method=ALIASES.get(method, method),
                                                                  batch_size=args.batch_size)
        maps = _maps(e, method, batch.shape[2:])
        result = _evaluate.evaluate(maps, boxes=boxes)
        if faithfulness or args.sanity:
            randomised, explain = (None, None)
            if args.sanity:
                randomised, explain = _sanity(torch_cli, loaded, alone, targets, method, args.sanity_layers,
                                              args.batch_size)
            more = _evaluate.evaluate(
                _maps(e_alone, method, alone.shape[2:]), score=score, inputs=alone, targets=targets,
                faithfulness=faithfulness, steps=args.steps, explain=explain, randomised=randomised,
                batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
            result.values.update(more.values)
            result.settings.update(more.settings)
        results[method] = result
    print("\n" + _table(results))
    if args.json:
        document = {"examples": [{"label": lb, "target": int(c), "box": b.tolist()}
                                 for lb, c, b in zip(labels, targets, boxes, strict=True)],
                    "methods": {m: r.to_json() for m, r in results.items()},
                    "model": args.model, **_timing(start, load)}
        write_json(args.json, document)
        print(f"\nwrote {args.json}")
    return 0


PERTURBATION = ("score-cam", "ablation-cam")
"""Methods that re-score the model on every channel's copy: all targets of an input from one run."""


def _explain(torch_cli: Any, loaded: Any, batch: np.ndarray, targets: np.ndarray, method: str,
             batch_size: int | None = None) -> Any:
    """``method``'s explanation of ``batch`` for ``targets`` (one per example); ``batch_size``: the
    perturbation methods' copies per forward (``--batch-size``).

    When ``batch`` is one input repeated (the demo's collage: one example per target) and the method
    re-scores perturbed copies (:data:`PERTURBATION`), the input is explained once with the N targets
    as ``(1, N)`` targets: Score-CAM's thousands of forwards (Ablation-CAM's head runs) give every
    class's score at once, so N times fewer. The maps equal the repeated batch's up to float32
    rounding of the activations (a batch of one, not of N).
    """
    if method in PERTURBATION and len(batch) > 1 and bool((batch == batch[:1]).all()):
        once = torch_cli.explain(loaded, batch[:1], np.asarray(targets)[None, :], method=method,
                                 batch_size=batch_size)
        return types.SimpleNamespace(maps=np.asarray(once.maps)[0])
    return torch_cli.explain(loaded, batch, targets, method=method, batch_size=batch_size)


def _maps(e: Any, method: str, shape: tuple[int, ...]) -> np.ndarray:
    """The method's maps upsampled (half-pixel bilinear) to ``shape``: Grad-CAM++ from the Grad-CAM
    capture ``e`` (the same activations and gradients), any other method's from its own ``e``."""
    import gradcam_ref

    raw = (gradcam_ref.grad_cam_plus_plus(e.activations, e.gradients) if ALIASES.get(method, method) == "grad-cam++"
           else e.maps)
    return np.asarray(gradcam_ref.upsample(np.asarray(raw), tuple(shape)))


def _lesions(args: argparse.Namespace, methods: tuple[str, ...], faithfulness: tuple[str, ...], start: float,
             load: tuple[float, float, float]) -> int:
    from gradcam_ref.experiments import comparison
    from gradcam_ref.experiments.lesions import SYNTHETIC_NOTE

    print(f"{args.test} {SYNTHETIC_NOTE}, unbiased set, exact lesion masks")
    results, data = comparison.lesion_comparison(
        [ALIASES.get(m, m) for m in methods], args.out, test=args.test, faithfulness=faithfulness,
        steps=args.steps, sanity=args.sanity, seed=args.seed, progress=not args.quiet)
    results = {m: results[ALIASES.get(m, m)] for m in methods}
    print("\n" + _table(results))
    if args.json:
        document = {"examples": {"note": SYNTHETIC_NOTE, "n": len(data), "labels": data.labels.tolist(),
                                 "has_cue": data.has_cue.tolist()},
                    "methods": {m: r.to_json() for m, r in results.items()},
                    "model": "GAIN experiment, plain mode", **_timing(start, load)}
        write_json(args.json, document)
        print(f"\nwrote {args.json}")
    return 0


def _timing(start: float, load: tuple[float, float, float]) -> dict[str, Any]:
    """The run's wall time and the load averages (1, 5, 15 minutes) at its start and end."""
    return {"elapsed_s": time.perf_counter() - start,
            "load_average": {"start": list(load), "end": list(os.getloadavg())}}


def _names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(f"{option} takes comma-separated names among {', '.join(allowed)}; got {text!r}")
    return names


def _scorer(loaded: Any) -> Any:
    from gradcam_ref import metrics

    return metrics.scorer(loaded.model, backend="torch")


def _demo(torch_cli: Any, loaded: Any, size: tuple[int, int], mean: Any, std: Any) -> tuple[Any, ...]:
    import skimage.data

    from gradcam_ref import viz

    photos = []
    for _, function in DEMO:
        photo = getattr(skimage.data, function)()
        photos.append(photo[0] if isinstance(photo, tuple) else photo)
    tiles = [viz.resize_image(p, size) for p in photos]
    alone = preprocess(tiles, size, mean, std)
    targets = np.argmax(torch_cli.explain(loaded, alone).scores, axis=1).astype(np.int64)
    canvas = viz.collage(tiles, columns=2)
    batch = np.repeat(preprocess([canvas], canvas.shape[:2], mean, std), len(tiles), axis=0)
    h, w = size
    boxes = np.array([[(i % 2) * w, (i // 2) * h, (i % 2 + 1) * w, (i // 2 + 1) * h] for i in range(len(tiles))])
    return batch, boxes, targets, [name for name, _ in DEMO], alone


def _images(torch_cli: Any, loaded: Any, args: argparse.Namespace, size: tuple[int, int], mean: Any,
            std: Any) -> tuple[Any, ...]:
    try:
        table = json.loads(Path(args.boxes).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--boxes {args.boxes}: cannot read a JSON object of boxes ({error})") from None
    images, boxes, labels = [], [], []
    for path in map(Path, args.images):
        box = table.get(path.name, table.get(str(path)))
        if box is None:
            raise UsageError(f"--boxes {args.boxes} has no box for {path.name}")
        image = load_image(path)
        sy, sx = size[0] / image.shape[0], size[1] / image.shape[1]
        x0, y0, x1, y1 = box
        boxes.append([int(np.floor(x0 * sx)), int(np.floor(y0 * sy)), int(np.ceil(x1 * sx)), int(np.ceil(y1 * sy))])
        images.append(image)
        labels.append(path.name)
    batch = preprocess(images, size, mean, std)
    if args.target == "auto":
        targets = np.argmax(torch_cli.explain(loaded, batch).scores, axis=1).astype(np.int64)
    else:
        names = class_names()
        targets = np.full(len(images), parse_target(args.target, names), dtype=np.int64)
    return batch, np.clip(np.array(boxes), 0, [size[1], size[0], size[1], size[0]]), targets, labels


def _sanity(torch_cli: Any, loaded: Any, batch: np.ndarray, targets: np.ndarray, method: str,
            layers: int | None, batch_size: int | None = None) -> tuple[Any, Any]:
    import dataclasses
    import itertools

    from gradcam_ref.backends.torch import randomise

    def explain(model: Any) -> np.ndarray:
        if isinstance(loaded.explained, tuple):  # the zoo's split form: split the randomised copy alike
            from gradcam_ref.zoo import efficientnet_lite0

            explained: Any = efficientnet_lite0.split_torch(model)
        else:
            explained = model
        name = ALIASES.get(method, method)
        e = torch_cli.explain(dataclasses.replace(loaded, model=model, explained=explained), batch, targets,
                              method="grad-cam" if name == "grad-cam++" else name, batch_size=batch_size)
        return _maps(e, method, batch.shape[2:])

    copies = randomise.randomised(loaded.model, order="cascading")
    return (copies if layers is None else itertools.islice(copies, layers)), explain


def _table(results: dict[str, Any]) -> str:
    from gradcam_ref._evaluate import HIGHER_IS_BETTER

    summaries = {m: r.summary() for m, r in results.items()}
    metrics_ = list(dict.fromkeys(k for s in summaries.values() for k in s))
    rows = [("metric", *results, "better")]
    for name in metrics_:
        better = "higher" if HIGHER_IS_BETTER.get(name.split("/")[0], False) else "lower"
        rows.append((name, *(f"{summaries[m][name]['mean']:.3f}" if name in summaries[m] else "-" for m in results),
                     better))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
