"""``gradcam-ref explain-dataset``: a torch model over a whole folder or list of images into a zarr store.

A thin layer over :func:`gradcam_ref.explain_dataset`: the model is loaded as ``gradcam-ref
explain`` loads it; progress (images/s, ETA) goes to stderr and a summary to stdout. Ctrl-C or
SIGTERM stops after the current unit (exit status 130 or 143); ``--resume`` continues.
"""

from __future__ import annotations

import argparse
from typing import Any

from gradcam_ref import zoo
from gradcam_ref.cli._common import UsageError, import_torch_cli


def add_parser(commands: Any, model_arguments: Any, positive: Any) -> None:
    command = commands.add_parser(
        "explain-dataset",
        help="Grad-CAM of a torch model over a folder or list of images into a zarr store (resumable).",
        description="Explain every image of DIR (recursively) or of a list file (one path a line) and write a "
        "zarr store: maps at the layer's resolution, targets, scores, top-5 classes, paths, errors. One batch is "
        "one chunk; a rerun with --resume skips the finished batches. Details: docs/scale.md.",
    )
    command.add_argument("images", metavar="DIR|LIST", help="a folder of images or a list file (.txt)")
    model_arguments(command)  # --model, --weights, --layer, --call, --device, --size, --mean, --std
    command.add_argument("--method", default="grad-cam", help="the CAM method (default grad-cam)")
    command.add_argument("--target", type=int, metavar="INT", help="class to explain (default: each image's top)")
    command.add_argument("--out", default="maps.zarr", help="the zarr store (default maps.zarr)")
    command.add_argument("--resume", action="store_true", help="continue the store OUT if it exists")
    command.add_argument("--shard", metavar="I/N", help="run only the I-th of N blocks of batches (0 <= I < N)")
    command.add_argument("--batch-size", type=positive, default=16, metavar="N", help="images per batch (default 16)")
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
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import gradcam_ref
    from gradcam_ref.dataset import Interrupted, StoreMismatch, UnreadableImage

    torch_cli = import_torch_cli()
    loaded = torch_cli.load(args.model, weights=args.weights, layer=args.layer, call=args.call, device=args.device)
    options = {} if loaded.call is None else {"call": loaded.call}
    size = args.size or (zoo.IMAGENET_SIZE, zoo.IMAGENET_SIZE)
    try:
        summary = gradcam_ref.explain_dataset(
            loaded.explained, args.images, layer=loaded.layer, target=args.target, method=args.method, out=args.out,
            batch_size=args.batch_size, device=args.device, resume=args.resume, shard=args.shard,
            num_workers=args.num_workers,
            size=size, mean=args.mean or zoo.IMAGENET_MEAN, std=args.std or zoo.IMAGENET_STD,
            on_error=args.on_error, threads=args.threads, engine=args.engine, workers=args.workers,
            scheduler=args.scheduler, num_gpus=args.num_gpus, progress=not args.quiet, **options)
    except Interrupted as stop:
        print(stop.summary)
        return 128 + stop.signal
    except FileExistsError as error:
        raise UsageError(f"--out {args.out}: exists; add --resume to continue it, or choose another --out") from error
    except (StoreMismatch, UnreadableImage, ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    print(summary)
    for path, reason in summary.failed[:10]:
        print(f"  unreadable: {path}: {reason}")
    if len(summary.failed) > 10:
        print(f"  ... and {len(summary.failed) - 10} more (the store's 'errors' array lists them all)")
    return 0
