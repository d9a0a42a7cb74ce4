"""gradcam_ref.viz: colormaps, overlays, figures and image I/O, against hand-computed values."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gradcam_ref import viz

# matplotlib's "jet" (the paper's colormap) runs from dark blue to dark red.
JET_0 = (0.0, 0.0, 0.5)
JET_1 = (0.5, 0.0, 0.0)


def test_colorize_jet_ends_and_gray():
    heat = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(viz.colorize(heat), [[JET_0, JET_1]])
    np.testing.assert_allclose(viz.colorize(heat, "gray"), [[(0, 0, 0), (1, 1, 1)]])
    assert viz.colorize(np.zeros((3, 5))).shape == (3, 5, 3)


def test_overlay_is_the_alpha_blend():
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    heat = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = viz.overlay(image, heat, alpha=0.25)
    grey = 200 / 255
    np.testing.assert_allclose(out[0, 0], [0.75 * grey, 0.75 * grey, 0.75 * grey + 0.25 * 0.5])
    np.testing.assert_allclose(out[0, 1], [0.75 * grey + 0.25 * 0.5, 0.75 * grey, 0.75 * grey])
    np.testing.assert_allclose(viz.overlay(image, heat, alpha=0.0), image / 255)
    np.testing.assert_allclose(viz.overlay(image, heat, alpha=1.0), viz.colorize(heat))


def test_overlay_accepts_float_and_grey_images():
    grey = np.full((2, 2), 0.5)
    out = viz.overlay(grey, np.zeros((2, 2)), cmap="gray", alpha=0.5)
    np.testing.assert_allclose(out, np.full((2, 2, 3), 0.25))


def test_a_coarse_map_is_upsampled_half_pixel_to_the_image():
    np.testing.assert_allclose(viz.fit_heat(np.array([[0.0, 1.0]]), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])
    out = viz.overlay(np.zeros((1, 4, 3), dtype=np.uint8), np.array([[0.0, 1.0]]), alpha=1.0)
    np.testing.assert_allclose(out, viz.colorize(np.array([[0.0, 0.25, 0.75, 1.0]])))


@pytest.mark.parametrize(
    ("heat", "message"),
    [
        (np.array([[0.0, 2.0]]), "normalise"),
        (np.array([[-0.1, 0.5]]), r"\[0, 1\]"),
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.zeros((1, 2, 2)), "2-D"),
        (np.zeros((0, 2)), "2-D"),
    ],
)
def test_bad_heat_is_refused(heat, message):
    with pytest.raises(ValueError, match=message):
        viz.overlay(np.zeros((2, 2, 3), dtype=np.uint8), heat)


def test_bad_arguments_are_refused():
    image, heat = np.zeros((2, 2, 3), dtype=np.uint8), np.zeros((2, 2))
    with pytest.raises(ValueError, match="colormap"):
        viz.overlay(image, heat, cmap="no-such-map")
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        viz.overlay(np.zeros((2, 2, 4), dtype=np.uint8), heat)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.overlay(np.full((2, 2, 3), 2.0), heat)
    with pytest.raises(TypeError, match="uint8 or floats"):
        viz.overlay(np.zeros((2, 2, 3), dtype=np.int64), heat)


IMAGE = np.zeros((4, 6, 3), dtype=np.uint8)


@pytest.mark.parametrize(("call", "error", "message"), [
    # sizes: "'int' object is not iterable", "not enough values to unpack", a float truncated
    (lambda: viz.fit_heat(np.zeros((2, 2)), None), ValueError, r"size must be a positive int or 2 positive ints .*got None"),
    (lambda: viz.fit_heat(np.zeros((2, 2)), (3.5, 2)), ValueError, r"size must be .*got \(3.5, 2\)"),
    (lambda: viz.resize_image(IMAGE, [6]), ValueError, r"size must be a positive int or 2 positive ints .*got \[6\]"),
    (lambda: viz.resize_image(IMAGE, True), ValueError, r"size must be .*got True"),
    (lambda: viz.resize_image(IMAGE, ("a", "b")), ValueError, r"size must be .*got \('a', 'b'\)"),
    # collage: columns=True was one column, None/'2'/1.5/[2] raw errors, an array "ambiguous"
    (lambda: viz.collage([IMAGE], True), ValueError, "columns must be an int >= 1, got True"),
    (lambda: viz.collage([IMAGE], None), ValueError, "columns must be an int >= 1, got None"),
    (lambda: viz.collage([IMAGE], 1.5), ValueError, "columns must be an int >= 1, got 1.5"),
    (lambda: viz.collage([IMAGE], np.array([1, 2])), ValueError, r"columns must be an int >= 1, got array\(\[1, 2\]\)$"),
    (lambda: viz.collage(None, 2), TypeError, "images must be a list of images, got NoneType"),
    (lambda: viz.collage(np.stack([IMAGE, IMAGE]), 2), TypeError, "images must be a list of images, got ndarray"),
    (lambda: viz.collage([], 2), ValueError, "collage needs at least one image"),
    # figure_size_px: image_shape=[1] was an IndexError, panels='a' a string of 320 'a's
    (lambda: viz.figure_size_px(3, [1]), ValueError, r"image_shape must be an image's shape \(H, W\[, C\]\) .*got \[1\]"),
    (lambda: viz.figure_size_px(3, (0, 4, 3)), ValueError, r"image_shape\[0\] must be an int >= 1 \(the image's height\), got 0$"),
    (lambda: viz.figure_size_px(3, (4, 2.5)), ValueError, r"image_shape\[1\] must be an int >= 1 \(the image's width\), got 2.5$"),
    (lambda: viz.figure_size_px("a", (4, 4)), ValueError, "panels must be an int >= 1, got 'a'"),
    (lambda: viz.figure_size_px(0, (4, 4)), ValueError, "panels must be an int >= 1, got 0"),
    # overlay: an array or None as alpha or cmap
    (lambda: viz.overlay(IMAGE, np.zeros((2, 2)), alpha=np.array([0.2, 0.5])), TypeError,
     r"alpha must be a number in \[0, 1\], got array\(\[0.2, 0.5\]\)$"),
    (lambda: viz.overlay(IMAGE, np.zeros((2, 2)), alpha=None), TypeError, r"alpha must be a number in \[0, 1\], got None$"),
    (lambda: viz.overlay(IMAGE, np.zeros((2, 2)), cmap=np.array(["jet"])), TypeError,
     r"cmap must be a matplotlib colormap name \(str\), got array\(\['jet'\], dtype='<U3'\)$"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_sizes_take_numpy_ints_and_an_int_for_both_sides():
    np.testing.assert_array_equal(viz.fit_heat(np.array([[0.0, 1.0]]), np.array([1, 4])), [[0.0, 0.25, 0.75, 1.0]])
    assert viz.resize_image(IMAGE, 3).shape == (3, 3, 3)
    assert viz.figure_size_px(np.int64(2), np.array([10, 20, 3])) == (2 * viz.PANEL_PX, viz.PANEL_PX // 2 + viz.TITLE_PX)


def _pixel(png, x, y):
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))[y, x].astype(int)


@pytest.mark.parametrize("with_guided", [False, True])
def test_figure_panels_and_png_size(tmp_path, with_guided):
    # A red image and a zero map: image panel red, heatmap jet(0), blend halfway between.
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[..., 0] = 255
    guided = None
    if with_guided:  # channel 0 high, channel 2 low: guided_image maps it to (0.5 +- 0.1 * 1.22)
        guided = np.zeros((3, 100, 200))
        guided[0], guided[2] = 1.0, -1.0
    fig = viz.figure(image, np.zeros((7, 7)), guided=guided, title="red", peak=(10, 10))
    path = tmp_path / "figure.png"
    viz.save_figure(fig, path)

    panels = 4 if with_guided else 3
    width, height = viz.figure_size_px(panels, image.shape)
    assert (width, height) == (panels * viz.PANEL_PX, viz.PANEL_PX // 2 + viz.TITLE_PX)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (width, height)
    middle_y = viz.TITLE_PX + (height - viz.TITLE_PX) // 2
    centre = [int((k + 0.5) * viz.PANEL_PX) for k in range(panels)]
    np.testing.assert_allclose(_pixel(path, centre[0], middle_y), [255, 0, 0], atol=1)
    np.testing.assert_allclose(_pixel(path, centre[1], middle_y), [0, 0, 128], atol=1)
    np.testing.assert_allclose(_pixel(path, centre[2], middle_y), [128, 0, 64], atol=1)
    if with_guided:  # mean 0, std sqrt(2/3): out = 0.5 + 0.1 * g / std = [0.622, 0.5, 0.378]
        expected = 255 * (0.5 + 0.1 * np.array([1.0, 0.0, -1.0]) / np.sqrt(2 / 3))
        np.testing.assert_allclose(_pixel(path, centre[3], middle_y), expected, atol=1.5)
    assert sorted(os.listdir(tmp_path)) == ["figure.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask  # not mkstemp's private 0600


def test_figure_refuses_a_guided_image_of_another_size():
    with pytest.raises(ValueError, match="guided"):
        viz.figure(np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((2, 2)), guided=np.zeros((3, 5, 5)))


def test_save_figure_leaves_nothing_when_writing_fails(tmp_path):
    fig = viz.figure(np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((2, 2)))

    def broken(path, **_):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        viz.save_figure(fig, tmp_path / "figure.png")
    assert os.listdir(tmp_path) == []


def test_images_round_trip_through_pillow(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    viz.save_image(rgb, tmp_path / "a.png")
    np.testing.assert_array_equal(viz.load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(np.full((2, 3), 7, dtype=np.uint8)).save(tmp_path / "grey.bmp")
    np.testing.assert_array_equal(viz.load_image(tmp_path / "grey.bmp"), np.full((2, 3, 3), 7))
    rgba = np.dstack([rgb, np.zeros((2, 3), dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(viz.load_image(tmp_path / "alpha.png"), rgb)
    viz.save_image(np.full((1, 1, 3), 0.5), tmp_path / "float.png")
    np.testing.assert_array_equal(viz.load_image(tmp_path / "float.png"), np.full((1, 1, 3), 128))


def test_unreadable_images_name_the_path(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png.*not an image"):
        viz.load_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match="missing.jpg.*no such file"):
        viz.load_image(tmp_path / "missing.jpg")


def test_resize_image_fits_the_whole_image():
    image = np.full((30, 50, 3), 77, dtype=np.uint8)
    out = viz.resize_image(image, (8, 12))
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 77)
    with pytest.raises(ValueError, match="size"):
        viz.resize_image(image, (0, 4))


def test_collage_layout():
    tiles = [np.full((2, 3, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    canvas = viz.collage(tiles, columns=2)
    assert canvas.shape == (4, 6, 3)
    assert canvas[0, 0, 0] == 10 and canvas[0, 3, 0] == 20 and canvas[2, 0, 0] == 30 and canvas[2, 3, 0] == 0
    with pytest.raises(ValueError, match="one shape"):
        viz.collage([tiles[0], np.zeros((3, 3, 3), dtype=np.uint8)], columns=2)


def test_viz_and_the_cli_parser_import_no_framework():
    code = (
        "import sys, gradcam_ref.viz, gradcam_ref.cli as c; c.build_parser(); "
        "bad = [m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
