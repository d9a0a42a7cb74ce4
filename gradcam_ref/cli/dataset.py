"""``gradcam-ref explain-dataset``: a torch model over a whole folder or list of images into a zarr store.

A thin layer over :func:`gradcam_ref.explain_dataset`: the model is loaded as ``gradcam-ref
explain`` loads it; progress (images/s, ETA) goes to stderr and a summary to stdout. Ctrl-C or
SIGTERM stops after the current unit (exit status 130 or 143); ``--resume`` continues.
``--metrics`` scores the maps in the same pass (``--boxes FILE.json`` / ``--masks DIR`` for the
localisation metrics) and prints each metric's mean at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref.cli._common import UsageError, check_output, import_torch_cli, model_inputs
from gradcam_ref.cli._options import MODEL_OPTIONS, add_shared, positive


def add_parser(commands: Any) -> None:
    """``gradcam-ref explain-dataset``'s options (those it shares: :mod:`gradcam_ref.cli._options`)."""
    # (duplicates pairs this header with demo's by shape alone: each command's own name and texts.)
    command = commands.add_parser(
        "explain-dataset",
        help="Grad-CAM of a torch model over a folder or list of images into a zarr store (resumable).",
        description="Explain every image of DIR (recursively) or of a list file (one path a line) and write a "
        "zarr store: maps at the layer's resolution, targets, scores, top-5 classes, paths, errors. One batch is "
        "one chunk; a rerun with --resume skips the finished batches. Details: docs/scale.md.",
    )
    command.add_argument("images", metavar="DIR|LIST", help="a folder of images or a list file (.txt)")
    add_shared(command, *MODEL_OPTIONS, "--batch-size", "--seed", "--quiet",
               defaults={"--seed": None})  # None: not given (the metrics' own default)
    command.add_argument("--method", default="grad-cam", help="the CAM method (default grad-cam)")
    command.add_argument("--target", type=int, metavar="INT", help="class to explain (default: each image's top)")
    command.add_argument("--out", default="maps.zarr", help="the zarr store (default maps.zarr)")
    command.add_argument("--resume", action="store_true", help="continue the store OUT if it exists")
    command.add_argument("--shard", metavar="I/N", help="run only the I-th of N blocks of batches (0 <= I < N)")
    command.add_argument("--num-workers", type=int, metavar="N", help="processes decoding images (local engine)")
    command.add_argument("--threads", type=positive, metavar="N", help="torch threads per process")
    command.add_argument("--on-error", default="record", choices=("record", "raise"),
                         help="an unreadable image: record it and go on (default), or stop")
    command.add_argument("--engine", default="local", choices=("local", "dask", "ray"), help="where batches run")
    command.add_argument("--workers", type=positive, default=2, metavar="N",
                         help="workers of a local Dask cluster or Ray actors (default 2)")
    command.add_argument("--scheduler", metavar="ADDR", help="a Dask scheduler or Ray cluster address")
    command.add_argument("--num-gpus", type=float, metavar="G",
                         help="GPUs per Ray actor (default: 1 with --device cuda, else 0)")
    command.add_argument("--metrics", metavar="NAMES",
                         help="comma-separated metrics of gradcam_ref.evaluate scored in the same pass and stored as "
                         "metrics/<name> (e.g. deletion,insertion,average_drop; localisation ones need --boxes or "
                         "--masks)")
    command.add_argument("--boxes", metavar="FILE.json",
                         help='one box per image, {"name.jpg": [x0, y0, x1, y1], ...} in the image\'s own pixels '
                         "(keys: file name, path relative to DIR|LIST's folder, or absolute path)")
    command.add_argument("--masks", metavar="DIR",
                         help="one mask image per image, DIR/<path relative to DIR|LIST's folder> with suffix .png "
                         "(non-zero: inside), resized to the input size (nearest)")
    command.add_argument("--steps", type=positive, metavar="N", help="deletion/insertion steps (default 100)")
    command.add_argument("--metric-batch-size", type=positive, metavar="N",
                         help="inputs per re-scoring forward pass of the metrics (default 64)")
    command.set_defaults(run=run)


class ImageBoxes:
    """``path -> box`` in input pixels: a box in the image's own pixels scaled to ``size`` (H, W) as the
    default preprocessing resizes (aspect not kept): floor of the start, ceiling of the end, clipped."""

    def __init__(self, table: dict[str, Any], file: str, root: Path, size: tuple[int, int]) -> None:
        self.table, self.file, self.root, self.size = table, file, root, size
        self.sha256 = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()

    def key(self, path: str) -> str | None:
        """The table's key for ``path``: its absolute path, its path under the root, or its file name."""
        found = Path(path)
        relative = os.path.relpath(found, self.root)
        return next((k for k in (str(found), relative, found.name) if k in self.table), None)

    def __call__(self, path: str) -> list[int]:
        from PIL import Image

        key = self.key(path)
        if key is None:
            raise ValueError(f"--boxes {self.file} has no box for {path}")
        with Image.open(path) as image:
            width, height = image.size  # the header only
        h, w = self.size
        sy, sx = h / height, w / width
        x0, y0, x1, y1 = (float(v) for v in self.table[key])
        box = [math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy)]
        return [min(max(v, 0), limit) for v, limit in zip(box, (w, h, w, h), strict=True)]

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": list(self.size)}  # the content, wherever the file lies


class MaskFiles:
    """``path -> (H, W)`` bool: the mask image for ``path`` under ``folder`` (same relative path, ``.png``),
    non-zero inside, resized to ``size`` by nearest neighbour."""

    def __init__(self, folder: str, root: Path, size: tuple[int, int]) -> None:
        self.folder, self.root, self.size = folder, root, size

    def file(self, path: str) -> Path:
        return (Path(self.folder) / os.path.relpath(path, self.root)).with_suffix(".png")

    def __call__(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.file(path)) as image:
            mask = image.convert("L").resize((self.size[1], self.size[0]), Image.Resampling.NEAREST)
        return np.asarray(mask) > 0

    def describe(self) -> dict[str, Any]:
        return {"folder": str(Path(self.folder).resolve()), "size": list(self.size)}


def _ground_truth(args: argparse.Namespace, size: tuple[int, int]) -> dict[str, Any]:
    """``metrics``, ``boxes``, ``masks`` and ``metric_options`` of explain_dataset from the options."""
    from gradcam_ref.dataset import list_images

    given = {"boxes": args.boxes, "masks": args.masks, "steps": args.steps,
             "metric-batch-size": args.metric_batch_size, "seed": args.seed}
    if not args.metrics:
        unused = [f"--{k}" for k, v in given.items() if v is not None]
        if unused:
            raise UsageError(f"{', '.join(unused)} need --metrics")
        return {}
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    options = {k: v for k, v in (("steps", args.steps), ("batch_size", args.metric_batch_size),
                                 ("seed", args.seed)) if v is not None}
    found: dict[str, Any] = {"metrics": names, "metric_options": options}
    source = Path(args.images)
    root = (source if source.is_dir() else source.parent).resolve()
    paths = list_images(args.images) if args.boxes or args.masks else []
    if args.boxes:
        try:
            table = json.loads(Path(args.boxes).read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"--boxes {args.boxes}: cannot read a JSON object of boxes ({error})") from None
        if not isinstance(table, dict):
            raise UsageError(f"--boxes {args.boxes}: expected a JSON object {{name: [x0, y0, x1, y1]}}, "
                             f"got a {type(table).__name__}")
        boxes = ImageBoxes(table, args.boxes, root, size)
        missing = [p for p in paths if boxes.key(p) is None]
        if missing:
            raise UsageError(f"--boxes {args.boxes} has no box for {len(missing)} images, e.g. {missing[0]}")
        found["boxes"] = boxes
    if args.masks:
        masks = MaskFiles(args.masks, root, size)
        missing = [p for p in paths if not masks.file(p).is_file()]
        if missing:
            raise UsageError(f"--masks {args.masks} has no mask for {len(missing)} images, e.g. "
                             f"{masks.file(missing[0])} for {missing[0]}")
        found["masks"] = masks
    return found


def run(args: argparse.Namespace) -> int:
    import gradcam_ref
    from gradcam_ref.dataset import Interrupted, StoreMismatch, UnreadableImage

    out = check_output("--out", args.out, folder=True)
    if out.exists() and not args.resume:
        raise UsageError(_EXISTS.format(out=args.out))
    size, mean, std = model_inputs(args)
    torch_cli = import_torch_cli()
    loaded = torch_cli.load(args.model, weights=args.weights, layer=args.layer, call=args.call, device=args.device)
    options = {} if loaded.call is None else {"call": loaded.call}
    try:
        scoring = _ground_truth(args, size)
        summary = gradcam_ref.explain_dataset(
            loaded.explained, args.images, layer=loaded.layer, target=args.target, method=args.method, out=args.out,
            batch_size=args.batch_size, device=args.device, resume=args.resume, shard=args.shard,
            num_workers=args.num_workers,
            size=size, mean=mean, std=std,
            on_error=args.on_error, threads=args.threads, engine=args.engine, workers=args.workers,
            scheduler=args.scheduler, num_gpus=args.num_gpus, progress=not args.quiet, **scoring, **options)
    except Interrupted as stop:
        print(stop.summary)
        return 128 + stop.signal
    except FileExistsError as error:  # the store (made since the check), or something in the way of it
        if out.exists() and not args.resume:
            raise UsageError(_EXISTS.format(out=args.out)) from None
        raise UsageError(f"--out {args.out}: cannot create it ({error.strerror or error})") from None
    except (StoreMismatch, UnreadableImage, ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    print(summary)
    for path, reason in summary.failed[:10]:
        print(f"  unreadable: {path}: {reason}")
    if len(summary.failed) > 10:
        print(f"  ... and {len(summary.failed) - 10} more (the store's 'errors' array lists them all)")
    if scoring:
        print(_means(args.out, scoring["metrics"]))
    return 0


_EXISTS = "--out {out}: exists; add --resume to continue it, or choose another --out"


def _means(out: str, names: list[str]) -> str:
    """Each metric's mean over the store's images (all of them, resumed ones too), NaN ones left out."""
    import zarr

    rows = []
    for name in sorted(set(names)):
        values = np.asarray(zarr.open_array(f"{out}/metrics/{name}", mode="r")[...], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = f"{finite.mean():.4f}" if finite.size else "nan"
        rows.append(f"  {name}: mean {mean} over {finite.size} values" +
                    (f" ({values.size - finite.size} NaN)" if finite.size < values.size else ""))
    return "metrics (whole store):\n" + "\n".join(rows)
