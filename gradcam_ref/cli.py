"""The ``gradcam-ref`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def _demo_oracle(args: argparse.Namespace) -> int:
    """Grad-CAM on the NumPy oracle, printing every intermediate of Eq. 1 and Eq. 2."""
    import gradcam_ref
    from gradcam_ref.backends import numpy_backend

    rng = np.random.default_rng(args.seed)
    model = numpy_backend.Oracle.random(
        rng, in_channels=1, widths=[3], kernel_sizes=[2], num_classes=2, head="gap"
    )
    x = rng.standard_normal((1, 1, 4, 4)).round(1)
    e = gradcam_ref.explain(model, x)
    assert e.targets is not None  # class-index targets on the oracle
    z = e.activations.shape[-1] * e.activations.shape[-2]
    np.set_printoptions(precision=4, suppress=True)
    print("Grad-CAM on the NumPy oracle: conv 2x2 (3 maps) -> ReLU -> GAP -> linear (2 classes)\n")
    print(f"input x, 1x4x4:\n{x[0, 0]}\n")
    print(f"scores y (pre-softmax): {e.scores[0]}  -> target c = {e.targets[0]}\n")
    for k in range(e.activations.shape[1]):
        print(f"A^{k}:\n{e.activations[0, k]}\ndy^c/dA^{k}:\n{e.gradients[0, k]}\n")
    print(f"Eq. 1, alpha^c = (1/Z) sum_ij dy^c/dA_ij with Z = {z}: {e.weights[0]}")
    print(f"       (CAM weights w^c / Z:                       {model.head_params[0][0][e.targets[0]] / z})")
    print(f"Eq. 2 before the ReLU, sum_k alpha_k A^k:\n{gradcam_ref.cam(e.activations, e.weights)[0]}")
    print(f"Eq. 2, L^c = ReLU(...):\n{e.maps[0]}")
    print(f"upsampled to 4x4 (half-pixel bilinear):\n{gradcam_ref.upsample(e.maps, (4, 4))[0]}")
    print(f"normalised (min-max):\n{gradcam_ref.normalize(gradcam_ref.upsample(e.maps, (4, 4)))[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcam-ref", description="Grad-CAM, the reference implementation."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="Grad-CAM worked through on a built-in model.")
    demo.add_argument("--seed", type=int, default=3, help="seed of the oracle's random weights")
    demo.set_defaults(run=_demo_oracle)
    _add_verify(commands)
    return parser


def _add_verify(commands: argparse._SubParsersAction) -> None:
    """``gradcam-ref verify [--json] [--explain LIB] [--goldens DIR]`` (gradcam_ref.backends.verify)."""
    from gradcam_ref._conventions import CONVENTIONS

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

    def run(args: argparse.Namespace) -> int:
        from gradcam_ref.backends import verify

        return verify.cli(json_output=args.json, explain=args.explain, goldens_directory=args.goldens)

    verify.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
