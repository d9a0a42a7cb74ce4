"""``gradcam-ref gain``: GAIN on SYNTHETIC lesions with a planted cue (gradcam_ref.experiments)."""

from __future__ import annotations

import argparse
import sys
import time

from gradcam_ref.cli._common import UsageError, check_output


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from gradcam_ref.experiments import gain_experiment

    defaults = gain_experiment.Config()
    try:
        config = dataclasses.replace(
            defaults, seed=args.seed, train=args.train or defaults.train, test=args.test or defaults.test,
            epochs=args.epochs or defaults.epochs, masks=tuple(args.masks) if args.masks else defaults.masks,
            differentiable=args.differentiable)
    except TypeError as error:  # pragma: no cover - argparse has typed everything
        raise UsageError(str(error)) from None
    if any(k > config.train for k in config.masks):
        raise UsageError(f"--masks {','.join(map(str, config.masks))}: at most --train {config.train} images")
    out = check_output("--out", args.out, folder=True)
    start = time.perf_counter()
    print("GAIN (Li et al. 2018) on SYNTHETIC dermoscopy-like lesions with a planted ink/ruler cue; "
          "CPU, nothing downloaded")
    try:
        result = gain_experiment.run(config, out, progress=not args.no_progress)
    except gain_experiment.TrainingDiverged as error:
        print(f"gradcam-ref gain: error: {error}", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"wrote {out}/table.md, results.json, gain_benign.png, gain_malignant.png "
          f"(checkpoints in {out}/checkpoints) in {time.perf_counter() - start:.0f} s")
    return 0
