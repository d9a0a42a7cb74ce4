"""Pictures of Grad-CAM maps: colormaps, overlays and the per-image figure (extra ``viz``).

Matplotlib supplies the colormaps and draws the figures, Pillow reads and writes the images;
nothing here imports a deep-learning framework. Maps come in as NumPy arrays, e.g.
``explanation.numpy().maps``.

A figure shows, left to right, like Figures 4-6 of Selvaraju et al.:
the original image | the heatmap | the heatmap blended over the image | guided Grad-CAM
(the last panel only when a guided Grad-CAM image is given).

Example:
  >>> import numpy as np
  >>> image = np.zeros((4, 6, 3), dtype=np.uint8)                    # (H, W, 3) RGB
  >>> heat = np.array([[0.0, 1.0], [1.0, 0.0]])                      # any (h, w) in [0, 1]
  >>> overlay(image, heat, alpha=0.5).shape                          # upsampled to (H, W)
  (4, 6, 3)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import matplotlib
    from matplotlib.figure import Figure
    from PIL import Image, UnidentifiedImageError
except ModuleNotFoundError as error:  # pragma: no cover - exercised by the CLI's error test
    raise ModuleNotFoundError(
        f"gradcam_ref.viz needs matplotlib and Pillow ({error.name} is missing): "
        "pip install 'gradcam-ref[viz]'",
        name=error.name,
    ) from error

from gradcam_ref._arrays import check_int, shown
from gradcam_ref._files import atomic_path
from gradcam_ref._guided import guided_image
from gradcam_ref._postprocess import upsample
from gradcam_ref._resample import parse_size

__all__ = [
    "DPI",
    "PANEL_PX",
    "TITLE_PX",
    "collage",
    "colorize",
    "figure",
    "figure_size_px",
    "fit_heat",
    "load_image",
    "overlay",
    "resize_image",
    "save_figure",
    "save_image",
]

DPI = 100
"""Pixels per inch of saved figures: a figure is exactly :func:`figure_size_px` pixels."""
PANEL_PX = 320
"""Width of one panel of :func:`figure`, in pixels (its height follows the image's aspect)."""
TITLE_PX = 44
"""Height of the band above the panels (figure title and panel titles), in pixels."""


# --------------------------------------------------------------------------- images in and out


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any image Pillow can decode as RGB, ``(H, W, 3)`` uint8.

    Grey, palette, CMYK and alpha images are converted to RGB (alpha is dropped).

    Raises:
      ValueError: the file is missing, unreadable or not an image, naming the path.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else error
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {reason}") from None


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size = (height, width)`` (an int: a square) with Pillow's bicubic filter.

    The aspect ratio is not kept: the whole image is fitted to ``size``, so a map computed on
    the resized image lies over the whole original when upsampled back to its shape.

    Returns:
      ``(height, width, 3)`` uint8.
    """
    rgb = _as_rgb(image, "image")
    height, width = parse_size(size, 2)
    resized = Image.fromarray(_to_uint8(rgb)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def collage(images: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Images of one shape ``(h, w, 3)`` (a list) laid out row-major in a grid of ``columns`` columns.

    Missing cells of the last row are black. Returns ``(rows * h, columns * w, 3)`` uint8.
    """
    if not isinstance(images, Sequence) or isinstance(images, str):
        raise TypeError(f"images must be a list of images, got {type(images).__name__}")
    columns = check_int("columns", columns, 1, type_error=ValueError)
    if not images:
        raise ValueError("collage needs at least one image, got an empty list")
    tiles = [_to_uint8(_as_rgb(image, f"images[{i}]")) for i, image in enumerate(images)]
    shapes = {t.shape for t in tiles}
    if len(shapes) != 1:
        raise ValueError(f"collage needs images of one shape, got {sorted(shapes)}")
    h, w, _ = tiles[0].shape
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, k = divmod(i, columns)
        canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = tile
    return canvas


def save_image(image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write an RGB image (uint8, or float in [0, 1]) as a PNG, atomically.

    The file appears complete or not at all: it is written next to ``path`` under a temporary
    name and renamed into place.
    """
    rgb = _to_uint8(_as_rgb(image, "image"))
    with atomic_path(path) as temporary:
        Image.fromarray(rgb).save(temporary, format="PNG")


# --------------------------------------------------------------------------- colour


def colorize(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a map with a matplotlib colormap: ``(h, w)`` in [0, 1] to ``(h, w, 3)`` RGB floats.

    ``"jet"`` (the default) is the colormap of the Grad-CAM paper: 0 is dark blue, 1 dark red.

    Raises:
      ValueError: ``heat`` is not 2-D, not finite or outside [0, 1] (normalise it first with
        :func:`gradcam_ref.normalize`), or ``cmap`` is not a matplotlib colormap.
    """
    h = _check_heat(heat)
    return np.asarray(_colormap(cmap)(h)[..., :3], dtype=np.float64)


def overlay(image: np.ndarray, heat: np.ndarray, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    r"""Blend a coloured map over an image.

    .. math:: \text{out} = (1 - \alpha)\,\text{image} + \alpha\,\text{cmap}(\text{heat})

    with ``image`` scaled to [0, 1]. A ``heat`` of another shape than the image (e.g. the 7 x 7
    map of a layer) is first upsampled to the image's ``(H, W)`` by
    :func:`gradcam_ref.upsample` (half-pixel bilinear).

    Args:
      image: ``(H, W, 3)`` RGB (or ``(H, W)`` grey), uint8 or floats in [0, 1].
      heat: ``(h, w)`` map in [0, 1].
      cmap: a matplotlib colormap name; "jet" as in the paper.
      alpha: the weight of the heatmap, in [0, 1]; 0 gives the image, 1 the coloured map.

    Returns:
      ``(H, W, 3)`` float64 in [0, 1].
    """
    rgb = _as_float_rgb(image, "image")
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number in [0, 1], got {shown(alpha)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colored = colorize(fit_heat(heat, rgb.shape[:2]), cmap)
    return (1.0 - alpha) * rgb + alpha * colored


def fit_heat(heat: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``heat`` at ``size = (H, W)`` (an int: a square): upsampled half-pixel bilinearly when its shape differs."""
    h = _check_heat(heat)
    target = parse_size(size, 2)
    if h.shape == target:
        return h
    return np.clip(upsample(h[None], target)[0], 0.0, 1.0)


# --------------------------------------------------------------------------- the figure


def figure_size_px(panels: int, image_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(width, height)`` in pixels of a saved :func:`figure` of an image of ``image_shape``.

    Each panel is :data:`PANEL_PX` wide and as high as the image's aspect ratio asks, under a
    title band of :data:`TITLE_PX`.
    """
    panels = check_int("panels", panels, 1, type_error=ValueError)
    listed = isinstance(image_shape, (Sequence, np.ndarray)) and not isinstance(image_shape, str)
    if not (listed and np.ndim(image_shape) == 1 and len(image_shape) >= 2):
        raise ValueError(f"image_shape must be an image's shape (H, W[, C]) with H, W >= 1, got {shown(image_shape)}")
    height, width = (check_int(f"image_shape[{i}]", image_shape[i], 1, note=f" (the image's {side})",
                               type_error=ValueError) for i, side in enumerate(("height", "width")))
    return panels * PANEL_PX, max(1, round(PANEL_PX * height / width)) + TITLE_PX


def figure(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    guided: np.ndarray | None = None,
    title: str = "",
    heat_title: str = "Grad-CAM",
    cmap: str = "jet",
    alpha: float = 0.5,
    peak: tuple[float, float] | None = None,
) -> Figure:
    """One image's figure: original | heatmap | blend [| guided Grad-CAM].

    Args:
      image: ``(H, W, 3)`` RGB, uint8 or floats in [0, 1].
      heat: the map in [0, 1], any ``(h, w)``; upsampled to ``(H, W)`` (half-pixel bilinear).
      guided: the example's guided Grad-CAM ``(C, H, W)`` (channels first, as in
        ``Explanation.guided_grad_cam[n]``), any sign, shown in a fourth panel through the
        one documented display scaling, :func:`gradcam_ref.guided_image`; none when None.
      title: the figure's title (e.g. the class explained).
      heat_title: the title of the heatmap panel.
      cmap, alpha: as in :func:`overlay`.
      peak: ``(row, column)`` in image pixels, marked with a cross on the heatmap and the blend.

    Returns:
      A matplotlib Figure (no pyplot state) of :func:`figure_size_px` pixels at :data:`DPI`;
      write it with :func:`save_figure`.
    """
    rgb = _as_float_rgb(image, "image")
    fitted = fit_heat(heat, rgb.shape[:2])
    panels = [
        ("image", rgb),
        (heat_title, colorize(fitted, cmap)),
        ("blend", overlay(rgb, fitted, cmap=cmap, alpha=alpha)),
    ]
    if guided is not None:
        g = np.asarray(guided, dtype=np.float64)
        if g.ndim != 3 or g.shape[1:] != rgb.shape[:2]:
            raise ValueError(f"guided must have shape (C, H, W) with the image's (H, W) = {rgb.shape[:2]}, "
                             f"got {np.shape(guided)}")
        shown = guided_image(g[None])[0]  # (H, W, C) in [0, 1]
        panels.append(("guided Grad-CAM", shown if shown.shape[-1] == 3 else np.repeat(shown[..., :1], 3, axis=-1)))

    width, height = figure_size_px(len(panels), rgb.shape)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    panel_height = 1.0 - TITLE_PX / height
    if title:
        fig.text(0.5, 1.0 - 12 / height, title, ha="center", va="center", fontsize=11)
    shown_size = (height - TITLE_PX, PANEL_PX)
    extent = (-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5)  # axes in image pixels, for `peak`
    for index, (name, picture) in enumerate(panels):
        axes = fig.add_axes((index / len(panels), 0.0, 1.0 / len(panels), panel_height))
        # Drawn at the panel's own resolution (Pillow's area-averaging shrink), which is what the
        # PNG holds anyway and keeps drawing fast for large photos.
        axes.imshow(_shrink(picture, shown_size), extent=extent, interpolation="nearest")
        axes.set_title(name, fontsize=9, pad=4)
        axes.set_axis_off()
        if peak is not None and index in (1, 2):
            axes.plot([peak[1]], [peak[0]], marker="+", color="white", markersize=14, markeredgewidth=2)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Save ``fig`` as a PNG at :data:`DPI`, atomically (complete or absent, never half-written)."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=DPI)


# --------------------------------------------------------------------------- helpers


def _colormap(cmap: str) -> Any:
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a matplotlib colormap name (str), got {shown(cmap)}")
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"cmap must be a matplotlib colormap name (e.g. 'jet', 'viridis'), got {cmap!r}") from None


def _check_heat(heat: np.ndarray) -> np.ndarray:
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2 or 0 in h.shape:
        raise ValueError(f"heat must be one 2-D map (h, w), got shape {np.shape(heat)}")
    if not np.all(np.isfinite(h)):
        raise ValueError("heat contains NaN or Inf")
    low, high = float(h.min()), float(h.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"heat must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "normalise it first, e.g. gradcam_ref.normalize(maps)"
        )
    return h


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] != 3 or 0 in x.shape:
        raise ValueError(f"{name} must be an RGB image (H, W, 3) or grey (H, W), got shape {np.shape(image)}")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise TypeError(f"{name} must be uint8 or floats in [0, 1], got dtype {x.dtype}")
    if x.dtype.kind == "f" and not (np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError(f"{name} of floats must lie in [0, 1]")
    return x


def _as_float_rgb(image: np.ndarray, name: str) -> np.ndarray:
    x = _as_rgb(image, name)
    return x / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _shrink(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB float picture in [0, 1] shrunk to at most ``size = (h, w)`` by box filtering."""
    h, w = picture.shape[:2]
    if h <= size[0] and w <= size[1]:
        return picture
    channels = [
        Image.fromarray(np.asarray(picture[..., k], dtype=np.float32)).resize(
            (min(w, size[1]), min(h, size[0])), Image.Resampling.BOX
        )
        for k in range(3)
    ]
    return np.clip(np.stack([np.asarray(c, dtype=np.float64) for c in channels], axis=-1), 0.0, 1.0)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    return np.round(rgb * 255.0).astype(np.uint8)
