"""The pointing game on real photos: does Grad-CAM of a real ImageNet network point at the object?

Four photos shipped with scikit-image are laid out as a 2 x 2 collage (224 x 224 per tile, one
448 x 448 input to the fully convolutional EfficientNet-Lite0, whose last features are then
14 x 14). For each photo, the class is the network's own top-1 prediction on the photo alone,
which must be a class a person sees in it (the sets below, written before looking at the maps).
The Grad-CAM map of that class on the collage, upsampled half-pixel to 448 x 448, must peak
inside the photo's tile and hold most of its mass there.

The photos are those of the demo except scikit-image's "astronaut": ImageNet-1k has no class
for a person or an astronaut (the network's best guess for it alone is "barbell" at 14%), so it
cannot be scored honestly; "rocket" (a launch vehicle on its pad, which ImageNet calls
"missile" or "projectile") takes its place.

Observed (torch 2.14.1, CPU): top-1 Egyptian cat / espresso / moped / missile; 89% / 86% /
77% / 71% of each map in its own tile, every peak in the right tile. The top-3 classes of each
photo localise as well (mass in the right tile 58-89%), though not all of them are asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from gradcam_ref.backends import torch_cli
from gradcam_ref.backends.zoo import efficientnet_lite0 as zoo

import gradcam_ref
from gradcam_ref import cli, viz

PHOTOS = {
    "chelsea": (skimage.data.chelsea, {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lynx"}),
    "coffee": (skimage.data.coffee, {"espresso", "cup", "coffee mug"}),
    "motorcycle": (lambda: skimage.data.stereo_motorcycle()[0], {"moped", "motor scooter"}),
    "rocket": (skimage.data.rocket, {"missile", "projectile", "space shuttle"}),
}


@pytest.mark.slow
def test_each_photos_class_points_into_its_own_tile():
    names = cli.class_names()
    loaded = torch_cli.load("efficientnet-lite0")
    tile = zoo.IMAGE_SIZE
    tiles = [viz.resize_image(load(), (tile, tile)) for load, _ in PHOTOS.values()]

    alone = torch_cli.explain(loaded, cli.preprocess(tiles, (tile, tile), zoo.MEAN, zoo.STD))
    classes = [int(c) for c in alone.targets]
    for (photo, (_, seen)), c in zip(PHOTOS.items(), classes, strict=True):
        assert names[c] in seen, f"{photo}: the network's top-1 is {names[c]!r}, not one of {sorted(seen)}"

    canvas = viz.collage(tiles, columns=2)
    batch = cli.preprocess([canvas], canvas.shape[:2], zoo.MEAN, zoo.STD)
    e = torch_cli.explain(loaded, batch, np.array([classes]))  # (N, T) = (1, 4): four maps, one pass
    assert e.maps.shape == (1, 4, 14, 14)
    heats = np.asarray(gradcam_ref.upsample(e.maps[0], canvas.shape[:2]))
    for i, (photo, c) in enumerate(zip(PHOTOS, classes, strict=True)):
        row, column = cli.peak_of(heats[i])
        where = (row // tile) * 2 + column // tile
        shares = cli.tile_shares(heats[i], 2, 2)
        report = f"{photo} ({names[c]}): peak at {(row, column)} in tile {where}, mass per tile {np.round(shares, 2)}"
        assert where == i, report
        assert shares[i] > 0.5, report
