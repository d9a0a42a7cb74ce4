"""gradcam_ref.gain: GAIN's mask and losses (Eq. 3-8), hand-computed values, scipy's expit as an
independent sigmoid, NumPy / torch / JAX agreement in float64, and the error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gradcam_ref
from gradcam_ref import gain, upsample
from tests.strategies import edgy_arrays

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(arrays(np.float64, (2, 3, 4), elements=unit), st.floats(0.01, 0.99), st.floats(0.1, 1000.0))
def test_soft_mask_is_the_sigmoid_of_eq_4(maps, sigma, omega):
    """T = expit(omega (A - sigma)) (scipy, an independent sigmoid), in [0, 1], monotone in A."""
    t = gain.soft_mask(maps, sigma=sigma, omega=omega)
    np.testing.assert_allclose(t, scipy.special.expit(omega * (maps - sigma)), rtol=1e-12, atol=1e-300)
    assert ((t >= 0) & (t <= 1)).all()
    order = np.argsort(maps, axis=None, kind="stable")
    assert (np.diff(t.ravel()[order]) >= 0).all()


def test_soft_mask_defaults_values_at_the_ends():
    """sigma 0.5, omega 10: T(0) = expit(-5) = 0.006693, T(1) = 0.993307, T(sigma) = 1/2 exactly."""
    t = gain.soft_mask(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(t, [0.0066928509242848554, 0.5, 0.9933071490757153], rtol=1e-14)
    assert t[1] == 0.5


def test_numpy_scalars_are_numbers():
    """np.float32(0.5) was refused as out of (0, 1): NumPy's scalars are numbers like Python's."""
    maps = np.array([0.0, 0.5, 1.0])
    np.testing.assert_array_equal(gain.soft_mask(maps, sigma=np.float32(0.5), omega=np.int64(10)),
                                  gain.soft_mask(maps, sigma=0.5, omega=10.0))


def test_sigmoid_gradient_is_finite_for_huge_logits():
    z = torch.tensor([-1e4, -800.0, 0.0, 800.0, 1e4], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gain.sigmoid(z).sum(), z)
    assert torch.isfinite(g).all() and g[2] == 0.25 and g[0] == 0.0
    np.testing.assert_array_equal(gain.sigmoid(z).detach().numpy(), [0.0, scipy.special.expit(-800.0), 0.5, 1.0, 1.0])
    tiny = gain.sigmoid(np.array([-700.0, -30.0]))  # full relative precision far below 0.5
    np.testing.assert_allclose(tiny, scipy.special.expit([-700.0, -30.0]), rtol=1e-15)


def test_normalize_maps_min_max_with_constant_range():
    maps = np.array([[[1.0, 3.0], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(gain.normalize_maps(maps), [[[0.0, 0.5], [0.25, 1.0]], [[0, 0], [0, 0]]])
    # the derivative is 1/span at every pixel (min and max are constants), 0 for a flat map
    t = torch.tensor(maps, requires_grad=True)
    (g,) = torch.autograd.grad(gain.normalize_maps(t).sum(), t)
    np.testing.assert_array_equal(g.numpy(), np.concatenate([np.full((1, 2, 2), 0.25), np.zeros((1, 2, 2))]))
    # (N, T, *spatial): one range per (example, target)
    multi = np.stack([maps, 2 * maps + 1], axis=1)
    out = gain.normalize_maps(multi, spatial_rank=2)
    np.testing.assert_array_equal(out[:, 0], gain.normalize_maps(maps))
    np.testing.assert_array_equal(out[:, 1], gain.normalize_maps(maps))


def test_masked_image_eq_3_by_hand():
    """I* = I - T(up(A)) I: a map at 2x2 upsampled to 4x4 (half-pixel), then Eq. 4, on 2 channels."""
    rng = np.random.default_rng(0)
    images = rng.random((1, 2, 4, 4))
    maps = np.array([[[0.0, 1.0], [0.25, 0.5]]])
    up = upsample(maps, (4, 4))
    np.testing.assert_allclose(up[0, 0], [0.0, 0.25, 0.75, 1.0])
    t = scipy.special.expit(10 * (up - 0.5))
    np.testing.assert_allclose(gain.masked_image(images, maps), images - t[:, None] * images, rtol=1e-14)
    # a map of ones erases the image down to T(1) = 0.9933 of it; zeros keep 0.9933
    np.testing.assert_allclose(gain.masked_image(images, np.ones((1, 2, 2))), images * scipy.special.expit(-5))


def test_attention_mining_loss_eq_5():
    s = np.array([[0.2, 0.9, 0.4], [0.5, 0.1, 0.3]])
    assert gain.attention_mining_loss(s, np.array([1, 0])) == pytest.approx((0.9 + 0.5) / 2, rel=1e-15)
    multi = np.array([[1, 0, 1], [0, 1, 1]])
    assert gain.attention_mining_loss(s, multi) == pytest.approx(((0.2 + 0.4) / 2 + (0.1 + 0.3) / 2) / 2, rel=1e-15)


def test_external_supervision_loss_eq_7_and_the_present_flags():
    maps = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    masks = np.array([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert gain.external_supervision_loss(maps, masks) == pytest.approx((1 / 4 + 1 / 4) / 2, rel=1e-15)
    assert gain.external_supervision_loss(maps, masks, np.array([1, 0])) == pytest.approx(1 / 4, rel=1e-15)
    assert gain.external_supervision_loss(maps, masks, np.array([0, 0])) == 0.0  # no label: 0, not NaN
    # masks at the image size: the map is upsampled to them (a constant map stays constant)
    big = gain.external_supervision_loss(maps[1:], np.zeros((1, 8, 8)))
    assert big == pytest.approx(0.25, rel=1e-15)


def test_eq_6_and_eq_8():
    assert gain.self_guided_loss(1.5, 0.25) == 1.75
    assert gain.self_guided_loss(1.5, 0.25, alpha=2.0) == 2.0
    assert gain.gain_ext_loss(1.5, 0.25, 0.125) == 1.5 + 0.25 + 10 * 0.125
    assert gain.gain_ext_loss(1.5, 0.25, 0.125, alpha=0.0, w_e=4.0) == 2.0


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_the_same_numbers_in_torch_and_jax(library):
    rng = np.random.default_rng(3)
    maps, images = rng.random((3, 4, 4)) * 7, rng.standard_normal((3, 2, 8, 8))
    masks, present = (rng.random((3, 8, 8)) > 0.5) * 1.0, np.array([1.0, 0.0, 1.0])
    scores, labels = rng.random((3, 5)), np.array([4, 0, 2])

    def run(conv):
        n = gain.normalize_maps(conv(maps))
        return [gain.soft_mask(n, sigma=0.3, omega=20.0), gain.masked_image(conv(images), n),
                gain.attention_mining_loss(conv(scores), conv(labels)),
                gain.external_supervision_loss(n, conv(masks), conv(present))]

    expected = run(np.asarray)
    if library == "torch":
        got = run(torch.as_tensor)
    else:
        with jax.enable_x64(True):
            got = run(jnp.asarray)
    for e, g in zip(expected, got, strict=True):
        assert type(g).__module__.split(".")[0] in (library, "jaxlib")
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: gain.soft_mask(np.zeros(3), sigma=0.0), r"sigma \(the mask threshold of Eq. 4.*\(0, 1\), got 0.0"),
    (lambda: gain.soft_mask(np.zeros(3), sigma=1.5), r"sigma .* got 1.5"),
    (lambda: gain.soft_mask(np.zeros(3), omega=0), r"omega \(the mask sharpness of Eq. 4\) must be .* > 0, got 0"),
    (lambda: gain.soft_mask(np.zeros(3), omega=float("inf")), r"omega .* got inf"),
    (lambda: gain.soft_mask(np.array([0.0, 2.0])), r"maps must lie in \[0, 1\] \(normalise them first"),
    (lambda: gain.masked_image(np.ones((2, 3, 4, 4)), np.ones((2, 4))), r"maps must have shape \(N, \*s\)"),
    (lambda: gain.attention_mining_loss(np.array([[3.0, -1.0]]), [0]), r"scores must lie in \[0, 1\] \(probab"),
    (lambda: gain.attention_mining_loss(np.array([[0.3, 0.1]]), [2]), r"labels \(N,\) must be class indices"),
    (lambda: gain.attention_mining_loss(np.array([[0.3, 0.1]]), [[0, 0]]), r"at least one 1 per row"),
    (lambda: gain.external_supervision_loss(np.ones((2, 2, 2)), np.ones((3, 4, 4))), r"masks must have shape"),
    (lambda: gain.external_supervision_loss(np.ones((1, 2, 2)), np.full((1, 4, 4), 2.0)), r"masks must lie in"),
    (lambda: gain.external_supervision_loss(np.ones((1, 2, 2)), np.ones((1, 4, 4)), [1, 1]), r"present must have"),
    (lambda: gain.gain_ext_loss(1.0, 1.0, 1.0, w_e=-1), r"w_e \(the weight of L_e\)"),
    (lambda: gain.self_guided_loss(1.0, 1.0, alpha=float("nan")), r"alpha \(the weight of L_am\)"),
    (lambda: gain.normalize_maps(np.array([[np.nan, 1.0]])), r"maps contains NaN"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@given(arrays(np.float64, (2, 3, 3), elements=st.one_of(st.just(0.0), st.floats(0.0, 1e300), st.floats(0.0, 1e-300))))
def test_normalize_maps_properties(maps):
    """Exact zeros, ties, huge and tiny values: [0, 1], min 0 and max 1 unless flat, order kept, no NaN."""
    out = gain.normalize_maps(maps)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    for m, o in zip(maps, out, strict=True):
        if m.max() > m.min():
            assert o.min() == 0.0 and o.max() == 1.0
            order = np.argsort(m, axis=None, kind="stable")
            assert (np.diff(o.ravel()[order]) >= 0).all()  # monotone: the order of pixels is kept (ties may form)
        else:
            assert (o == 0).all()


@given(edgy_arrays((2, 3)))
@example(np.array([[-1e308, 1e308, 0.0], [1.0, 2.0, 3.0]]))
def test_normalize_maps_are_the_core_normalize_even_for_spans_past_the_largest_float(maps):
    """A span wider than the largest float64 ([-1e308, 1e308]) was refused as 'NaN or Inf'."""
    np.testing.assert_array_equal(gain.normalize_maps(maps), gradcam_ref.normalize(maps))


def test_normalize_maps_of_a_float16_span_past_65504():
    maps = torch.tensor([[-4e4, 0.0, 4e4]], dtype=torch.float16, requires_grad=True)
    out = gain.normalize_maps(maps)
    assert out.dtype == torch.float16 and out.tolist() == [[0.0, 0.5, 1.0]]
    out.sum().backward()  # d/dx of (x - min) / span with min and span held: 1 / 8e4 at each pixel
    torch.testing.assert_close(maps.grad, torch.full((1, 3), 1 / 8e4, dtype=torch.float16))
    np.testing.assert_array_equal(gain.normalize_maps(np.array([[-1e308, 1e308]])), [[0.0, 1.0]])


def test_nan_pixels_and_logits_are_refused():
    """One NaN pixel made a NaN erased image, a NaN logit a NaN score; +-inf logits are scores 1 and 0."""
    images, maps = np.ones((1, 2, 2, 2)), np.full((1, 2, 2), 0.5)
    np.testing.assert_allclose(gain.masked_image(images, maps), 1.0 - scipy.special.expit(0.0), rtol=1e-15)
    images[0, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^images contains NaN or Inf \(1 of 8 values\); masked_image needs finite "
                                         r"images$"):
        gain.masked_image(images, maps)
    np.testing.assert_array_equal(gain.sigmoid(np.array([-np.inf, 0.0, np.inf])), [0.0, 0.5, 1.0])
    for library in (np.asarray, torch.as_tensor):
        with pytest.raises(ValueError, match=r"^logits contains NaN \(1 of 2 values\); sigmoid needs numbers"):
            gain.sigmoid(library(np.array([np.nan, 0.0])))


def test_labels_and_present_flags_come_from_the_scores_library():
    """torch scores with NumPy labels: 'ndarray has no attribute to' (and the reverse: 'no attribute astype')."""
    scores, multi = torch.tensor([[0.2, 0.9], [0.4, 0.1]], dtype=torch.float64), [[1.0, 0.0], [1.0, 1.0]]
    want = (0.2 + (0.4 + 0.1) / 2) / 2
    assert float(gain.attention_mining_loss(scores, torch.tensor(multi))) == pytest.approx(want, rel=1e-15)
    assert float(gain.attention_mining_loss(scores, multi)) == pytest.approx(want, rel=1e-15)  # a list is taken
    for s, labels, names in ((scores, np.array(multi), "scores: torch.Tensor, labels: numpy.ndarray"),
                             (scores.numpy(), torch.tensor(multi), "scores: numpy.ndarray, labels: torch.Tensor"),
                             (scores, np.array([0, 1]), "scores: torch.Tensor, labels: numpy.ndarray")):
        with pytest.raises(TypeError, match=rf"^arrays must all come from one library, got {names}$"):
            gain.attention_mining_loss(s, labels)
    maps, masks = torch.full((2, 2, 2), 0.5, dtype=torch.float64), torch.zeros((2, 4, 4), dtype=torch.float64)
    loss = gain.external_supervision_loss(maps, masks, torch.tensor([1.0, 0.0]))
    assert float(loss) == 0.25
    with pytest.raises(TypeError, match=r"^arrays must all come from one library, got maps: torch.Tensor, "
                                        r"present: numpy.ndarray$"):
        gain.external_supervision_loss(maps, masks, np.array([1.0, 0.0]))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: gain.external_supervision_loss(np.ones((2, 6, 6)), np.ones((2, 6, 0))),
     r"masks must have shape \(N, \*S\) with N and rank of maps \(2, 6, 6\) and no empty axis, got masks of shape "
     r"\(2, 6, 0\)"),
    (lambda: gain.external_supervision_loss(np.ones((2, 0, 6)), np.ones((2, 6, 6))),
     r"maps must have shape \(N, \*s\) with no empty axis, got \(2, 0, 6\)"),
    (lambda: gain.masked_image(np.ones((2, 3, 6, 0)), np.full((2, 6, 6), 0.5)),
     r"images must have shape \(N, C, \*S\) with no empty axis, got \(2, 3, 6, 0\)"),
    (lambda: gain.masked_image(np.ones((2, 3, 6, 6)), np.ones((2, 6, 0))),
     r"maps must have shape \(N, \*s\) for images .* no empty one, got maps of shape \(2, 6, 0\)"),
    (lambda: gain.normalize_maps(np.ones((2, 6, 6)), spatial_rank=-1),
     r"spatial_rank must be an int in \[1, 2\] for maps of shape \(2, 6, 6\) \(a batch axis first\), got -1"),
    (lambda: gain.normalize_maps(np.ones((2, 6, 6)), spatial_rank=float("inf")),
     r"spatial_rank must be an int in \[1, 2\] .* got inf"),
])
def test_empty_axes_and_spatial_rank_are_named(call, message):
    """They said 'size must be a positive int...' (of upsample) or 'maps must have shape' (for spatial_rank)."""
    with pytest.raises(ValueError, match="^" + message + "$"):
        call()


def test_normalize_maps_spatial_rank_one():
    maps = np.array([[[0.0, 2.0, 4.0], [1.0, 1.0, 3.0]]])  # (N, T, s): each row its own map
    np.testing.assert_array_equal(gain.normalize_maps(maps, spatial_rank=1), [[[0.0, 0.5, 1.0], [0.0, 0.0, 1.0]]])
