"""Grad-CAM++ (Chattopadhay et al., Eq. 19): the literal formula, (N, T), relu=False, autograd
through torch and JAX, and the peers pytorch-grad-cam (same formula) and torchcam (another one)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchcam.methods import GradCAMpp as TorchcamGradCAMpp

import gradcam_ref
from gradcam_ref import cam, grad_cam_plus_plus
from gradcam_ref._arrays import namespace
from gradcam_ref._gradcam import plus_plus_weights
from gradcam_ref.conventions import postprocess
from tests.strategies import feature_maps, moderate_values


def literal(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Eq. 19 written out with loops: a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3), w = sum a_ij ReLU(g)."""
    n, k = a.shape[:2]
    w = np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            s = a[i, j].sum()
            for gij in g[i, j].flat:
                den = 2 * gij**2 + s * gij**3
                w[i, j] += (gij**2 / den if den != 0 else 0.0) * max(gij, 0.0)
    return w


def random_pair(seed, shape=(2, 3, 4, 5), t=None):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    g = rng.standard_normal(shape if t is None else (shape[0], t, *shape[1:]))
    return a, g


@pytest.mark.parametrize("seed", range(4))
def test_equals_the_literal_formula(seed):
    a, g = random_pair(seed)
    w = literal(a, g)
    np.testing.assert_allclose(grad_cam_plus_plus(a, g, relu=False), cam(a, w), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad_cam_plus_plus(a, g), np.maximum(cam(a, w), 0), rtol=1e-12, atol=1e-14)


@given(feature_maps(elements=moderate_values, multi=True))
def test_multi_target_maps_are_the_single_target_maps(ag):
    a, g = ag
    for relu in (True, False):
        multi = grad_cam_plus_plus(a, g, relu=relu)
        assert multi.shape == (a.shape[0], g.shape[1], *a.shape[2:])
        for t in range(g.shape[1]):
            # the same numbers up to the order of summation (the layouts reduce differently)
            single = grad_cam_plus_plus(a, g[:, t], relu=relu)
            np.testing.assert_allclose(multi[:, t], single, rtol=1e-14, atol=1e-14 * np.abs(single).max(initial=0))


@given(feature_maps(elements=moderate_values, multi=False))
def test_relu_false_is_the_signed_map_whose_positive_part_is_the_map(ag):
    a, g = ag
    signed = grad_cam_plus_plus(a, g, relu=False)
    np.testing.assert_array_equal(grad_cam_plus_plus(a, g), np.where(signed > 0, signed, 0.0))


def test_negative_gradients_do_not_count_and_zero_gradients_give_zero_maps():
    a, g = random_pair(7)
    np.testing.assert_array_equal(grad_cam_plus_plus(a, -np.abs(g)), np.zeros((2, 4, 5)))
    np.testing.assert_array_equal(grad_cam_plus_plus(a, np.maximum(g, 0)), grad_cam_plus_plus(a, g))


def test_torch_inputs_stay_torch_and_autograd_is_right():
    a, g = random_pair(3, shape=(2, 3, 3, 4))
    ta = torch.tensor(a, requires_grad=True)
    tg = torch.tensor(g, requires_grad=True)
    out = grad_cam_plus_plus(ta, tg, relu=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.requires_grad
    np.testing.assert_allclose(out.detach().numpy(), grad_cam_plus_plus(a, g, relu=False), rtol=1e-13)
    # Away from the kinks (g = 0, the switch of form at g = 1), finite differences agree with autograd;
    # the where() branches never put a NaN into the gradient.
    assert torch.autograd.gradcheck(lambda a, g: grad_cam_plus_plus(a, g, relu=False), (ta, tg))
    loss = grad_cam_plus_plus(ta, tg * 1e200).sum()  # huge gradients: finite map, finite derivatives
    loss.backward()
    assert torch.isfinite(ta.grad).all() and torch.isfinite(tg.grad).all()


def test_jax_inputs_trace_and_differentiate_like_torch():
    import jax

    a, g = random_pair(4, shape=(2, 3, 3, 4), t=2)
    with jax.enable_x64(True):
        jnp = jax.numpy

        def loss(a, g):
            return jnp.sum(grad_cam_plus_plus(a, g) ** 2)

        value, (da, dg) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(a), jnp.asarray(g))
    ta, tg = torch.tensor(a, requires_grad=True), torch.tensor(g, requires_grad=True)
    torch_loss = (grad_cam_plus_plus(ta, tg) ** 2).sum()
    torch_loss.backward()
    np.testing.assert_allclose(float(value), float(torch_loss.detach()), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(da), ta.grad.numpy(), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(np.asarray(dg), tg.grad.numpy(), rtol=1e-11, atol=1e-13)


# --- the peers --------------------------------------------------------------------------------


def peer_model():
    """conv -> ReLU -> conv (the layer, 4 x 5) -> ReLU -> GAP -> linear with large weights, float64.

    Large head weights make dy/dA of order 1, so that the peers' eps (1e-6 in pytorch-grad-cam's
    denominator, about g^2) is below their float32 rounding.
    """
    torch.manual_seed(11)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(6, 5, 3, stride=2, padding=1),
        relu2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(5, 4),
    )).double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(40.0)
    x = torch.as_tensor(np.random.default_rng(12).standard_normal((3, 3, 8, 10)))
    return model, x, [0, 3, 1]


def our_plus_plus(model, x, targets, layer):
    e = gradcam_ref.explain(model, x, targets, layer=layer)
    return e, grad_cam_plus_plus(e.activations, e.gradients, relu=False)


def test_pytorch_grad_cam_gradcam_plus_plus():
    """pytorch-grad-cam 1.5.7 computes Eq. 19 as we do; its ReLU, min-max and cv2 resize are the
    'pytorch-grad-cam' convention."""
    model, x, targets = peer_model()
    e, signed = our_plus_plus(model, x, targets, "relu2")
    assert float(e.gradients.abs().mean()) > 0.1  # eps of 1e-6 is negligible against 2 g^2
    with PgcGradCAMPlusPlus(model=model, target_layers=[model.relu2]) as method:
        reference = method(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    ours = postprocess(signed, "pytorch-grad-cam", size=tuple(x.shape[2:])).numpy()
    assert reference.shape == ours.shape == (3, 8, 10) and np.ptp(reference) > 0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    plain = postprocess(cam(e.activations, e.weights), "pytorch-grad-cam", size=(8, 10)).numpy()
    assert np.abs(plain - reference).max() > 1e-2  # Grad-CAM's map is another: the match means something


def test_torchcam_gradcampp_is_another_formula():
    """torchcam 0.5.0's GradCAMpp divides a copy (``alpha[mask].div_``: boolean indexing copies),
    so its weights are sum_ij g^2 ReLU(g) = sum_ij ReLU(g)^3, not Eq. 19: ``variant="torchcam"``
    and the torchcam convention reproduce it (run against the library itself)."""
    model, x, targets = peer_model()
    e, signed = our_plus_plus(model, x, targets, "relu2")
    with TorchcamGradCAMpp(model, target_layer="relu2") as extractor:
        (reference,) = extractor(class_idx=targets, scores=model(x))
    cubes = torch.relu(e.gradients).pow(3).flatten(2).sum(-1)  # (N, K)
    theirs = postprocess(cam(e.activations, cubes), "torchcam")
    np.testing.assert_allclose(theirs.numpy(), reference.numpy(), rtol=0, atol=1e-6)
    ours = postprocess(signed, "torchcam")
    assert np.abs(ours.numpy() - reference.numpy()).max() > 1e-2
    variant = gradcam_ref.explain(model, x, targets, layer="relu2", method="grad-cam++", variant="torchcam")
    torch.testing.assert_close(variant.weights, cubes, rtol=1e-12, atol=0)
    paper = gradcam_ref.explain(model, x, targets, layer="relu2", method="grad-cam++")
    for made in (variant, paper):  # the convention recomputes the weights of a paper explanation
        np.testing.assert_allclose(made.heatmap(None, "torchcam").numpy(), reference.numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="eps is for variant='paper'.*variant='torchcam' has none"):
        grad_cam_plus_plus(e.activations, e.gradients, variant="torchcam", eps=1e-6)


# --- half precision --------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-5, 1e-4, 1e-3, 1e-2, 1.0]), st.sampled_from([0.0, 1e-6]),
       st.sampled_from([torch.float16, torch.bfloat16]))
@example(seed=200, size=1e-5, eps=1e-6, dtype=torch.float16)  # float32 weights of 2e-8: float16's are 0
def test_half_precision_weights_are_the_float32_weights_of_the_same_values(seed, size, eps, dtype):
    """float16 gradients below 3e-5 made 2 d2 / c overflow, and c^3 underflowed under pytorch-grad-cam's
    eps=1e-6 (below 4e-3): every term 0, an all-zero map. The weights are the float32 weights of the
    same values, cast: Grad-CAM++ and Smooth Grad-CAM++ (whose maps then weigh A in half precision)."""
    rng = np.random.default_rng(seed)
    a = torch.tensor(rng.random((2, 3, 5, 5)), dtype=dtype)
    g = torch.tensor(rng.standard_normal((2, 2, 3, 5, 5)) * size, dtype=dtype)  # (n=2 samples, N, K, ...)
    xp = namespace(a)
    wide = plus_plus_weights(xp, a.float(), g[0].float(), eps=eps)
    want = cam(a, wide.to(dtype))
    got = grad_cam_plus_plus(a, g[0], eps=eps, relu=False)
    assert got.dtype == dtype and torch.equal(got, want)
    if float(wide.abs().max()) >= torch.finfo(dtype).smallest_normal:  # else the weights round to 0 (seed=200)
        assert float(want.abs().max()) > 0
    smooth = cam(a, plus_plus_weights(xp, a.float(), g.float(), samples=True).to(dtype))
    torch.testing.assert_close(gradcam_ref.smooth_grad_cam_plus_plus(a, g, relu=False), smooth, rtol=0, atol=0)


def test_half_precision_maps_are_near_the_float64_maps_of_the_same_values():
    """The cases of the sweep: positive float16 gradients of 1e-5 (smooth too), and eps=1e-6 on 1e-3."""
    torch.manual_seed(0)
    a = torch.rand(1, 4, 7, 7).half()
    for g, eps in (((torch.rand(1, 4, 7, 7) * 2e-5 + 5e-6).half(), 0.0), ((torch.randn(1, 4, 7, 7) * 1e-3).half(), 1e-6)):
        wide = grad_cam_plus_plus(a.double(), g.double(), eps=eps)
        assert float(wide.max()) > 0
        torch.testing.assert_close(grad_cam_plus_plus(a, g, eps=eps).double(), wide, rtol=4e-3, atol=0)
        if not eps:
            twice = torch.stack([g, g])
            torch.testing.assert_close(gradcam_ref.smooth_grad_cam_plus_plus(a, twice).double(),
                                       gradcam_ref.smooth_grad_cam_plus_plus(a.double(), twice.double()),
                                       rtol=4e-3, atol=0)
