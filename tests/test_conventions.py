"""Conventions: each step by hand, each resize kernel against the library it stands for, the records.

The peers themselves (captum, pytorch-grad-cam, torchcam) are run in tests/backends/test_peers.py.
"""

import cv2  # installed with pytorch-grad-cam (the peers extra): the reference for its resize
import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref.conventions import (
    CONVENTIONS,
    PAPER,
    REASONS,
    MinMax,
    Relu,
    Resize,
    describe,
    get_convention,
    postprocess,
)
from tests.strategies import resize_cases

# --- each convention on hand-computed maps ------------------------------------------------------


def test_paper_relu_then_half_pixel_upsampling_then_min_max():
    # [[0, 2], [4, -2]] -> ReLU [[0, 2], [4, 0]] -> 4x4 half-pixel bilinear -> / 4 (min 0, max 4)
    signed = np.array([[[0.0, 2.0], [4.0, -2.0]]])
    ramp = np.array([0.0, 0.25, 0.75, 1.0])  # [0, 1] upsampled by 2
    r, c = ramp[:, None], ramp[None, :]
    up = 2 * (1 - r) * c + 4 * r * (1 - c)  # bilinear of [[0, 2], [4, 0]]: a(1-r)(1-c) + b(1-r)c + ...
    np.testing.assert_allclose(postprocess(signed, "paper", size=4)[0], up / 4, rtol=0, atol=1e-15)
    assert postprocess(signed, "paper", size=(4, 4)).max() == 1.0


def test_paper_normalises_after_upsampling_so_the_heatmap_spans_exactly_0_to_1():
    # A 3-cell map upsampled by 3/2 never lands on the middle cell's centre: normalising first
    # would leave the maximum below 1.
    signed = np.array([[0.0, 1.0, 0.0]])
    heat = postprocess(signed, "paper", size=(4,))
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert gradcam_ref.upsample(gradcam_ref.normalize(signed), (4,)).max() < 1.0


def test_pytorch_grad_cam_normalises_with_eps_1e_minus_7_twice():
    m = np.array([[0.0, 2.0, 4.0]])  # no resize (size None): two passes of (x - min) / (max + 1e-7)
    first = 4.0 + 1e-7
    second = 4.0 / first + 1e-7
    expected = np.array([[0.0, 2.0, 4.0]]) / first / second
    np.testing.assert_allclose(postprocess(m, "pytorch-grad-cam"), expected, rtol=1e-15)
    assert postprocess(m, "pytorch-grad-cam").max() < 1.0


def test_torchcam_normalises_with_eps_1e_minus_8_at_the_layer_resolution():
    m = np.array([[-3.0, 1.0, 3.0]])  # ReLU -> [0, 1, 3] -> / (3 + 1e-8)
    np.testing.assert_allclose(postprocess(m, "torchcam"), [[0.0, 1 / (3 + 1e-8), 3 / (3 + 1e-8)]], rtol=1e-15)
    np.testing.assert_array_equal(postprocess(m, "torchcam", size=3), postprocess(m, "torchcam"))
    with pytest.raises(ValueError, match=r"'torchcam' convention keeps the layer's resolution \(3,\).*size=5"):
        postprocess(m, "torchcam", size=5)


def test_captum_keeps_the_sign_and_copies_the_nearest_cell_at_floor_i_times_scale():
    m = np.array([[-1.0, 3.0]])  # 2 -> 5: floor(i * 0.4) = 0, 0, 0, 1, 1
    np.testing.assert_array_equal(postprocess(m, "captum", size=5), [[-1.0, -1.0, -1.0, 3.0, 3.0]])
    np.testing.assert_array_equal(postprocess(m, "captum"), m)  # no size: LayerGradCam's raw map


def test_tf_keras_vis_resizes_corner_aligned_then_normalises_with_eps_1e_minus_7():
    m = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(postprocess(m, "tf-keras-vis", size=4), [[0.0, 1 / 3, 2 / 3, 1.0]] / np.float64(1 + 1e-7),
                               rtol=1e-15)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_a_flat_map_gives_no_nan(name):
    flat = np.full((2, 3, 3), -0.5)
    size = (5, 4) if get_convention(name).resizes else None
    out = postprocess(flat, name, size=size)
    expected = -0.5 if name == "captum" else 0.0
    np.testing.assert_array_equal(out, np.full((2, *(size or (3, 3))), expected))


# --- resize kernels against their libraries ------------------------------------------------------

@given(resize_cases)
def test_tf_keras_vis_resize_equals_scipy_zoom_order_1(p):
    rank = len(p["shape_in"])
    out = tuple(p["shape_out"][:rank])
    x = np.random.default_rng(p["seed"]).random((p["n"], *p["shape_in"]))
    ours = Resize("linear-corner", by="zoom")(np, x, out, rank)
    # tf-keras-vis: zoom(cam, zoom_factor(cam.shape, input.shape), order=1), the batch axis by 1
    ref = scipy.ndimage.zoom(x, (1.0, *(o / i for o, i in zip(out, p["shape_in"], strict=True))), order=1)
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


@given(resize_cases)
def test_captum_resize_equals_torch_nearest_interpolate(p):
    rank = len(p["shape_in"])
    out = tuple(p["shape_out"][:rank])
    x = np.random.default_rng(p["seed"]).random((p["n"], *p["shape_in"]))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=out, mode="nearest")[:, 0].numpy()
    np.testing.assert_array_equal(postprocess(x, "captum", size=out), ref)


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 224), (3, 10), (5, 7), (6, 96), (13, 100), (9, 4), (17, 31)])
def test_nearest_index_uses_torchs_float32_arithmetic(n_in, n_out):
    x = np.arange(float(n_in))[None, None, :]  # (1, 1, n): the index itself
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out,), mode="nearest")[0].numpy()
    np.testing.assert_array_equal(postprocess(x[0], "captum", size=n_out), ref)


@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 9), st.integers(1, 40), st.integers(1, 40))
def test_pytorch_grad_cam_resize_equals_cv2_inter_linear(seed, h, w, out_h, out_w):
    x = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    ref = cv2.resize(x, (out_w, out_h))  # cv2 takes (width, height); INTER_LINEAR by default
    ours = Resize("linear-half-pixel", by="cv2", ranks=(2,))(np, x[None].astype(np.float64), (out_h, out_w), 2)[0]
    np.testing.assert_allclose(ours, ref.reshape(out_h, out_w), rtol=0, atol=2e-6)


def test_pytorch_grad_cam_refuses_to_resize_other_than_2d_maps():
    with pytest.raises(ValueError, match=r"resizes 2-D maps only \(cv2.resize INTER_LINEAR on float32\), got 3-D"):
        postprocess(np.ones((1, 2, 2, 2)), "pytorch-grad-cam", size=4)
    assert postprocess(np.ones((1, 2, 2, 2)), "pytorch-grad-cam").shape == (1, 2, 2, 2)  # no resize: fine


# --- arrays of every library, batches of targets --------------------------------------------------


def test_heatmap_of_torch_explanation_stays_torch_and_matches_numpy():
    from gradcam_ref.verify.twins import torch_oracle

    oracle = gradcam_ref.backends.numpy_backend.Oracle.random(
        np.random.default_rng(3), in_channels=2, widths=[4], kernel_sizes=[3], num_classes=3)
    x = np.random.default_rng(4).standard_normal((2, 2, 7, 7))
    e_np = gradcam_ref.explain(oracle, x, [0, 2])
    e_t = gradcam_ref.explain(torch_oracle(oracle, torch.float32), torch.from_numpy(x).float(), [0, 2],
                              layer="relu0")
    for name in CONVENTIONS:
        size = (9, 11) if get_convention(name).resizes else None
        heat = e_t.heatmap(size, name)
        assert isinstance(heat, torch.Tensor) and heat.dtype == torch.float32
        np.testing.assert_allclose(heat.numpy(), e_np.heatmap(size, name), rtol=0,
                                   atol=1e-5 * np.abs(e_np.heatmap(size, name)).max())


def test_multi_target_heatmaps_are_one_per_target():
    oracle = gradcam_ref.backends.numpy_backend.Oracle.random(
        np.random.default_rng(5), in_channels=1, widths=[3], kernel_sizes=[2], num_classes=4)
    x = np.random.default_rng(6).standard_normal((2, 1, 6, 6))
    e = gradcam_ref.explain(oracle, x, np.array([[0, 1, 3], [2, 2, 0]]))
    for name in CONVENTIONS:
        size = (8, 7) if get_convention(name).resizes else None
        heat = e.heatmap(size, name)
        assert heat.shape == (2, 3, *(size or (5, 5)))
        for t in range(3):
            single = gradcam_ref.explain(oracle, x, e.targets[:, t]).heatmap(size, name)
            np.testing.assert_allclose(heat[:, t], single, rtol=1e-14, atol=1e-15)


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_convention_names_the_known_ones():
    with pytest.raises(ValueError, match=r"convention must be one of \['captum', 'paper', 'pytorch-grad-cam', "
                                         r"'tf-keras-vis', 'torchcam', 'xplique'\], got 'gradcam\+\+'"):
        postprocess(np.ones((1, 2, 2)), "gradcam++")
    assert get_convention("PGC") is CONVENTIONS["pytorch-grad-cam"]
    assert get_convention(" tf_keras_vis ") is CONVENTIONS["tf-keras-vis"]


@pytest.mark.parametrize(("size", "match"), [
    ((4,), r"size must be None, a positive int or 2 positive ints .* spatial shape is \(2, 2\)\), got \(4,\)"),
    ((0, 3), r"got \(0, 3\)"),
    ((2.5, 3), r"got \(2.5, 3\)"),
    ("ab", r"2 positive ints"),
])
def test_bad_size_is_refused(size, match):
    with pytest.raises(ValueError, match=match):
        postprocess(np.ones((1, 2, 2)), "paper", size=size)


def test_bad_spatial_rank_and_empty_maps_are_refused():
    with pytest.raises(ValueError, match=r"spatial_rank must be an int in \[1, 2\] for signed_maps of shape \(1, 2, 2\)"):
        postprocess(np.ones((1, 2, 2)), "paper", spatial_rank=3)
    with pytest.raises(ValueError, match=r"signed_maps must not be empty, got shape \(1, 0, 2\)"):
        postprocess(np.ones((1, 0, 2)), "paper")
    with pytest.raises(ValueError, match=r"signed_maps contains NaN or Inf"):
        postprocess(np.array([[0.0, np.nan]]), "captum", size=3)
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        Resize("bicubic", by="PIL")
    # a 0-d or 1-d array was blamed on spatial_rank ("an int in [1, -1] ... got None")
    for bad in (np.array(1.0), np.ones(3)):
        with pytest.raises(ValueError, match=rf"signed_maps must have shape \(N, \*spatial\) with at least one "
                                             rf"spatial axis, got shape \({'3,' * bad.ndim}\)$"):
            postprocess(bad, "paper")
    with pytest.raises(TypeError, match=r"method must be None or a method name \(str\), got array\(\['grad-cam'\], dtype='<U8'\)$"):
        postprocess(np.ones((1, 2, 2)), "paper", method=np.array(["grad-cam"]))  # "unhashable type"


# --- the records ---------------------------------------------------------------------------------


def test_every_convention_is_documented_with_its_version_and_differences():
    for name, c in CONVENTIONS.items():
        assert c.name == name
        assert c is PAPER or any(ch.isdigit() for ch in c.library), c.library  # a library's version
        assert c is not PAPER or "Selvaraju" in c.library
        assert c.steps and c.returns and c.checked
        assert all(reason in REASONS for reason, _ in c.differences)
        assert bool(c.differences) == (c is not PAPER)
        text = describe(name)
        for _, words in c.differences:
            assert words in text
        for step in c.steps:
            assert step.describe() in text


def test_the_differences_cover_the_steps_that_differ_from_the_papers():
    """Every step a library does not share with the paper is explained by some reason."""
    paper = set(PAPER.steps)
    for c in CONVENTIONS.values():
        reasons = {reason for reason, _ in c.differences}
        if not any(isinstance(s, Relu) for s in c.steps):
            assert 1 in reasons
        if any(isinstance(s, MinMax) for s in set(c.steps) - paper) or not any(isinstance(s, MinMax) for s in c.steps):
            assert 5 in reasons
        if any(isinstance(s, Resize) for s in set(c.steps) - paper) or not c.resizes:
            assert 7 in reasons, c.name
