"""Guided Grad-CAM's arithmetic and the display helper: goldens, torch's upsampling as a reference,
layouts, array libraries, bad input; pytorch-grad-cam's deprocess_image as a reference."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradcam_ref
from gradcam_ref import guided_grad_cam, guided_image
from gradcam_ref.backends import numpy_backend
from gradcam_ref.cli import _common as common


def test_golden_2d():
    g = np.array([[[[1.0, -2.0], [3.0, 4.0]], [[0.5, 0.0], [-1.0, 2.0]]]])  # N=1, C=2, 2x2
    maps = np.array([[[2.0]]])  # 1x1: upsampled to a constant 2
    np.testing.assert_array_equal(guided_grad_cam(g, maps), 2.0 * g)
    maps = np.array([[[0.0, 1.0]]])  # 1x2 -> 2x2: rows [0, 1]
    want = g * np.array([[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_array_equal(guided_grad_cam(g, maps), want)


def test_equals_torch_bilinear_upsampling_times_guided():
    import torch  # part of `make test`: never skipped
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 2, 4, 3, 10, 12))[:, 0]  # (N=3, T=4, C=3, 10, 12), non-contiguous
    maps = np.abs(rng.standard_normal((3, 4, 5, 3)))
    up = torch.nn.functional.interpolate(torch.as_tensor(maps), size=(10, 12), mode="bilinear", align_corners=False)
    want = g * up.numpy()[:, :, None]
    np.testing.assert_allclose(guided_grad_cam(g, maps), want, rtol=1e-13, atol=1e-15)
    for t in range(4):  # each target on its own
        np.testing.assert_allclose(guided_grad_cam(g[:, t], maps[:, t]), want[:, t], rtol=1e-13, atol=1e-15)


def test_spatial_rank_tells_volumes_from_targets():
    """(2, 3, 4, 5, 6) with maps (2, 3, 2, 3): a 3-D volume with C = 3 and a 3-D map, or T = 3
    targets of a 2-D image with C = 4 and 2-D maps: both shapes fit, spatial_rank decides."""
    import torch  # part of `make test`: never skipped
    interpolate = torch.nn.functional.interpolate
    rng = np.random.default_rng(1)
    g, maps = rng.standard_normal((2, 3, 4, 5, 6)), rng.standard_normal((2, 3, 2, 3))
    volume = interpolate(torch.as_tensor(maps)[:, None], size=(4, 5, 6), mode="trilinear", align_corners=False)
    np.testing.assert_allclose(guided_grad_cam(g, maps, spatial_rank=3), g * volume.numpy(), rtol=1e-13, atol=1e-15)
    images = interpolate(torch.as_tensor(maps), size=(5, 6), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(guided_grad_cam(g, maps), g * images.numpy()[:, :, None], rtol=1e-13, atol=1e-15)
    line = guided_grad_cam(np.ones((1, 2, 4)), np.array([[0.0, 1.0]]), spatial_rank=1)
    np.testing.assert_array_equal(line, [[[0.0, 0.25, 0.75, 1.0]] * 2])


def test_torch_and_jax_arrays_stay_what_they_are():
    import jax.numpy as jnp  # part of `make test`
    import torch  # part of `make test`: never skipped
    rng = np.random.default_rng(2)
    g, maps = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((2, 3, 3))
    want = guided_grad_cam(g, maps)
    g32 = torch.as_tensor(g, dtype=torch.float32).requires_grad_(True)
    got = guided_grad_cam(g32, torch.as_tensor(maps, dtype=torch.float32))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.grad_fn is not None
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    got = guided_grad_cam(jnp.asarray(g, dtype=jnp.float32), jnp.asarray(maps, dtype=jnp.float32))
    assert got.dtype == jnp.float32 and type(got).__module__.startswith("jax")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    image = guided_image(torch.as_tensor(g))
    assert isinstance(image, torch.Tensor) and image.shape == (2, 6, 6, 3)
    np.testing.assert_allclose(image.numpy(), guided_image(g), rtol=0, atol=1e-15)


def test_bad_input():
    g, maps = np.ones((2, 3, 4, 4)), np.ones((2, 2, 2))
    with pytest.raises(ValueError, match=r"got guided_backprop \(2, 3, 4, 4\) and maps \(3, 2, 2\)"):
        guided_grad_cam(g, np.ones((3, 2, 2)))  # N differs
    with pytest.raises(ValueError, match=r"got guided_backprop \(2, 3, 4, 4\) and maps \(2, 2, 2, 2, 2\)"):
        guided_grad_cam(g, np.ones((2, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"got guided_backprop \(2, 3, 4\) and maps \(2, 2, 2\)"):
        guided_grad_cam(g[..., 0], maps)  # 1-D input with 2-D maps
    with pytest.raises(ValueError, match="spatial_rank must be a positive int, got 0"):
        guided_grad_cam(g, maps, spatial_rank=0)
    with pytest.raises(ValueError, match="maps contains NaN"):
        guided_grad_cam(g, np.full((2, 2, 2), np.nan))
    with pytest.raises(TypeError, match="guided_backprop must have a real numeric dtype"):
        guided_grad_cam(g.astype(bool), maps)
    with pytest.raises(ValueError, match=r"guided must have shape \(..., C, H, W\).*\(4, 4\)"):
        guided_image(np.ones((4, 4)))
    with pytest.raises(ValueError, match="guided contains NaN or Inf"):
        guided_image(np.full((1, 1, 2, 2), np.inf))
    for bad in (0, float("inf"), float("nan")):  # inf: a flat image came out NaN (inf * 0)
        with pytest.raises(ValueError, match=f"scale must be a finite number > 0, got {bad}"):
            guided_image(g, scale=bad)
    for bad in (None, "0.1", True, np.array([0.1])):  # None: "'<' not supported between int and NoneType"
        with pytest.raises(TypeError, match=rf"^scale must be a finite number > 0, got {re.escape(repr(bad))}$"):
            guided_image(g, scale=bad)


# --- the display helper ---------------------------------------------------------------------------


def test_guided_image_golden_layout_and_flat_images():
    g = np.zeros((2, 3, 2, 3, 4))  # (N=2, T=3, C=2, H=3, W=4)
    g[0, 1, 1, 2, 3] = 10.0  # one bright pixel in channel 1
    out = guided_image(g)
    assert out.shape == (2, 3, 3, 4, 2) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[1], 0.5)  # flat images: mid-grey, no NaN
    image = out[0, 1]
    # 24 values, one of them 10: mean 10/24, std = sqrt(23) * 10/24 (population).
    mean, std = 10 / 24, np.sqrt(23) * 10 / 24
    np.testing.assert_allclose(image[2, 3, 1], 0.5 + 0.1 * (10 - mean) / std, rtol=1e-15)  # 0.5 + 0.1 sqrt(23)
    np.testing.assert_allclose(image[0, 0, 0], 0.5 - 0.1 * mean / std, rtol=1e-15)  # 0.5 - 0.1 / sqrt(23)
    brighter = guided_image(g, scale=0.2)[0, 1]
    assert brighter[2, 3, 1] == 1.0  # 0.5 + 0.2 sqrt(23) > 1: clipped
    np.testing.assert_allclose(brighter[0, 0, 0], 0.5 - 0.2 * mean / std, rtol=1e-15)


def test_guided_image_matches_pytorch_grad_cam_deprocess_image():
    import pytorch_grad_cam.utils.image as image_utils  # the peers extra, part of `make test`
    rng = np.random.default_rng(3)
    g = rng.standard_normal((3, 16, 16)) * 1e-2 + 1e-3
    ours = guided_image(g[None])[0]
    theirs = image_utils.deprocess_image(g.transpose(1, 2, 0))  # (H, W, C) uint8, std + 1e-5
    assert theirs.dtype == np.uint8 and theirs.shape == ours.shape
    # Their 1e-5 changes the scale by 1e-5 / std ~ 1e-3, then truncation to uint8: at most 1 apart.
    assert np.abs(ours * 255 - theirs).max() <= 1.0 + 255 * 1e-3


# --- Explanation and explain ------------------------------------------------------------------------


def _oracle(head="gap-mlp"):
    rng = np.random.default_rng(4)
    model = numpy_backend.Oracle.random(rng, in_channels=2, widths=[3, 4], kernel_sizes=[2, 2], num_classes=3,
                                        head=head, input_size=6)
    return model, rng.standard_normal((2, 2, 6, 6))


@pytest.mark.parametrize("target", [[0, 2], [[0, 1], [2, 2]]])
def test_explanation_holds_guided_fields(target):
    model, x = _oracle()
    e = gradcam_ref.explain(model, x, target, layer="relu0", guided=True)
    assert e.guided_backprop.shape == e.guided_grad_cam.shape == np.shape(e.gradients)[:-3] + x.shape[1:]
    np.testing.assert_array_equal(e.guided_grad_cam, guided_grad_cam(e.guided_backprop, e.maps))
    copy = e.numpy()
    assert copy.guided_backprop.dtype == np.float64 and copy.guided_backprop is not e.guided_backprop
    plain = gradcam_ref.explain(model, x, target, layer="relu0")
    assert plain.guided_backprop is None and plain.guided_grad_cam is None and plain.numpy().guided_grad_cam is None
    np.testing.assert_array_equal(plain.maps, e.maps)


def test_backend_without_guided_support_is_refused(monkeypatch):
    import types

    from gradcam_ref import backends

    def capture(model, inputs, target, *, layer=None, guided=False):
        raise AssertionError("not reached")

    fake = types.SimpleNamespace(NAME="fake", GUIDED=False, DIFFERENTIABLE=False, capture=capture, explain=capture)
    monkeypatch.setattr(backends, "select", lambda model, inputs, backend: fake)
    with pytest.raises(TypeError, match="guided=True: the fake backend does not compute guided backpropagation"):
        gradcam_ref.explain(object(), np.ones((1, 1, 2, 2)), guided=True)


def test_the_cli_figure_shows_guided_grad_cam_when_there_is_one():

    rng = np.random.default_rng(5)
    model = numpy_backend.Oracle.random(rng, in_channels=3, widths=[4], kernel_sizes=[3], num_classes=3)
    x = rng.standard_normal((2, 3, 6, 6))
    e = gradcam_ref.explain(model, x, [0, 2], guided=True)
    panel = common.guided_panel(e, 1, (12, 12))
    np.testing.assert_allclose(panel, gradcam_ref.upsample(e.guided_grad_cam[1], (12, 12)))
    assert panel.shape == (3, 12, 12) and np.abs(panel).max() > 0
    assert common.guided_panel(gradcam_ref.explain(model, x, [0, 2]), 1, (12, 12)) is None


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, (2, 2, 3, 3), elements=st.integers(-64, 64).map(lambda i: i / 8)), st.integers(-1018, 1017))
def test_guided_image_of_a_scaled_image_is_the_same_image(x, k):
    """The output is scale-invariant, and now so is its computation: the squared deviations underflowed
    (float64 gradients near 1e-170: a flat 0.5 image) or overflowed (near 1e160: an error)."""
    np.testing.assert_array_equal(guided_image(x * 2.0**k), guided_image(x))


def test_guided_image_in_half_precision_and_of_tiny_float32_values_is_the_float32_image():
    """float16 gradients near 1e-4 (and float32 ones near 1e-23) gave one flat 0.5 image."""
    import torch

    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8))
    for dtype in (torch.float16, torch.bfloat16):
        low = torch.tensor(x * 1e-4, dtype=dtype)
        out = guided_image(low)
        assert out.dtype == dtype
        torch.testing.assert_close(out, guided_image(low.float()).to(dtype), rtol=0, atol=0)
        assert len(torch.unique(out)) > 100
    np.testing.assert_allclose(guided_image(torch.tensor(x * 1e-23, dtype=torch.float32)).double().numpy(),
                               guided_image(x), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(guided_image(np.full((1, 3, 3, 3), 0.1)), 0.5)  # a flat image whose mean rounds
