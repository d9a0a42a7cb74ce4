"""``gradcam-ref explain``: Grad-CAM of a torch model on image files, a figure and a raw map each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradcam_ref.cli._common import (
    UsageError,
    check_output,
    guided_panel,
    heat_on,
    import_torch_cli,
    load_image,
    model_inputs,
    parse_target,
    peak_of,
    preprocess,
    read_labels,
    staged_output,
)


def run(args: argparse.Namespace) -> int:
    """Grad-CAM of a torch model on image files: a figure and a raw map per image."""
    from tqdm import tqdm

    from gradcam_ref import viz

    out = check_output("--out", args.out, folder=True)
    names = read_labels(args.labels)
    target = parse_target(args.target, names)
    paths = [Path(p) for p in args.images]
    for path in paths:  # fail before any work on an image that cannot be read
        load_image(path)
    try:
        viz.colorize(np.zeros((1, 1)), args.cmap)
    except ValueError as error:
        raise UsageError(f"--cmap: {error}") from None
    torch_cli = import_torch_cli()
    size, mean, std = model_inputs(args)
    loaded = torch_cli.load(args.model, weights=args.weights, layer=args.layer, call=args.call, device=args.device)

    stems = _unique_stems(paths)
    batches = [range(i, min(i + args.batch_size, len(paths))) for i in range(0, len(paths), args.batch_size)]
    with staged_output(out) as stage:
        bar = tqdm(batches, unit="batch", desc="gradcam-ref explain", disable=True if len(batches) < 2 else None,
                   file=sys.stderr)
        for indices in bar:
            images = [load_image(paths[i]) for i in indices]
            e = torch_cli.explain(loaded, preprocess(images, size, mean, std), target, guided=args.guided)
            for j, (i, image) in enumerate(zip(indices, images, strict=True)):
                c = int(e.targets[j])
                label = names[c] if c < len(names) and len(names) == e.scores.shape[1] else f"class {c}"
                heat = heat_on(e.maps[j], image.shape[:2])
                row, column = peak_of(heat)
                fig = viz.figure(image, heat, guided=guided_panel(e, j, image.shape[:2]),
                                 title=f"{paths[i].name}: {label}", heat_title=f"Grad-CAM '{label}'",
                                 cmap=args.cmap, alpha=args.alpha, peak=(row, column))
                viz.save_figure(fig, stage / f"{stems[i]}.png")
                np.save(stage / f"{stems[i]}.npy", e.maps[j])
                tqdm.write(f"{paths[i]}: '{label}' ({c}), score {e.scores[j, c]:.4g}, map {e.maps[j].shape[0]}x"
                           f"{e.maps[j].shape[1]} peaks at x={column}, y={row} -> {stems[i]}.png, {stems[i]}.npy")
    print(f"wrote {2 * len(paths)} files to {out}/")
    return 0


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names: the file stems, with ``-2``, ``-3``, ... added to repeated ones."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, k = path.stem, 1
        while stem in used:
            k += 1
            stem = f"{path.stem}-{k}"
        used.add(stem)
        stems.append(stem)
    return stems
