"""Guided backpropagation and Guided Grad-CAM in the torch backend.

References: a hand-computed network; the same networks with every ReLU replaced explicitly by a
hand-written autograd Function (``RefGuidedReLU``, below, independent of the backend's code);
the NumPy oracle's hand-written guided backward; captum's GuidedBackprop and pytorch-grad-cam's
GuidedBackpropReLUModel (both guide ``nn.ReLU`` modules only, the latter the first example only).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from gradcam_ref.backends import torch as torch_backend
from gradcam_ref.verify.twins import torch_oracle
from tests.backends.test_torch_backend import inputs_for, one_thread, small_net  # noqa: F401
from tests.backends.torch_nets import assert_same_state, model_state


class RefGuidedReLU(torch.autograd.Function):
    """The straightforward reference: y = min(max(x, 0), upper); dx = g * (0 < x < upper) * (g > 0)."""

    @staticmethod
    def forward(ctx, x, upper=math.inf):
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(min=0) if upper == math.inf else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (x < ctx.upper) * (grad > 0), None


def ref_relu(x):
    return RefGuidedReLU.apply(x)


def ref_relu6(x):
    return RefGuidedReLU.apply(x, 6.0)


class MixedNet(nn.Module):
    """Every ReLU form the backend recognises, module and functional, in place and not.

    ``reference = True`` runs the same weights with each of them replaced by ``RefGuidedReLU``,
    so that plain autograd through it gives the guided gradients to compare with.
    """

    def __init__(self, seed: int, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc0 = nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, classes)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6(inplace=True)
        self.reference = False

    def forward(self, x):
        r = self.reference
        x = self.conv0(x)
        x = ref_relu(x) if r else self.relu(x)  # nn.ReLU
        y = self.conv1(x)
        y = ref_relu(y) if r else self.relu_inplace(y)  # nn.ReLU(inplace=True)
        y = 8.0 * y + 4.0 * x  # a residual: two paths meet; scaled so that ReLU6 saturates
        y = ref_relu6(y) if r else self.relu6(y)  # nn.ReLU6(inplace=True): F.hardtanh(0, 6)
        z = self.conv2(y)
        if r:
            z = ref_relu(z[:, :8]) + ref_relu6(4.0 * z[:, 8:])
        else:
            a = F.relu(z[:, :8])  # F.relu
            b = F.relu6(4.0 * z[:, 8:])  # F.relu6
            z = a + b
        z = torch.cat([z, z.flip(1)], dim=1)
        z = ref_relu(z) if r else torch.relu(z)  # torch.relu
        z = self.conv3(z)
        if r:
            z = torch.cat([ref_relu(z[:, :4]), ref_relu6(4.0 * z[:, 4:8]), ref_relu(z[:, 8:])], dim=1)
        else:
            p, q = z * 1.0, z * 4.0  # fresh tensors: in place on a view of each, once
            p[:, :4].relu_()  # Tensor.relu_ on a view
            q[:, 4:8].clamp_(0, 6)  # Tensor.clamp_(0, 6) on a view
            z = torch.cat([p[:, :4], q[:, 4:8], z[:, 8:].clamp(min=0)], dim=1)  # Tensor.clamp(min=0)
        h = self.fc0(z.mean(dim=(2, 3)))
        if r:
            h = torch.cat([ref_relu(h[:, :8]), ref_relu(h[:, 8:] * 1.5)], dim=1)
        else:  # Tensor.relu, and F.relu(inplace=True) on a fresh tensor
            h = torch.cat([h[:, :8].relu(), F.relu(h[:, 8:] * 1.5, inplace=True)], dim=1)
        return self.fc1(h)


MIXED_FORMS = {"relu": 7, "hardtanh": 1, "relu6": 1, "clamp": 2}
"""Guided calls per forward pass of MixedNet, by function (nn.ReLU6 calls F.hardtanh)."""


def reference_guided(model: nn.Module, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Guided backprop through ``model`` with ``reference = True``: ``(N, T, *x)`` for T seeds."""
    model.reference = True
    try:
        leaf = x.clone().requires_grad_(True)
        scores = model(leaf)
        rows = [torch.autograd.grad(scores, leaf, seed, retain_graph=True)[0] for seed in seeds]
    finally:
        model.reference = False
    return torch.stack(rows, dim=1)


def one_hot(targets: np.ndarray, classes: int) -> torch.Tensor:
    """``(T, N, classes)`` seeds for ``(N, T)`` (or ``(N,)``) class indices."""
    t = torch.as_tensor(targets).reshape(len(targets), -1)
    return F.one_hot(t.T, classes).to(torch.float64)


# --- the rule, by hand --------------------------------------------------------------------------


class HandNet(nn.Module):
    """x (1, 2, 1, 1) -> 1x1 conv W1 -> ReLU(inplace) -> 1x1 conv W2 -> F.relu -> linear W3.

    With x = (1, 2): z1 = W1 x = (-1, 3), h1 = (0, 3); z2 = W2 h1 = (3, 6) = h2; y = W3 h2.
    Class 0, W3[0] = (1, -1):
      plain:  dy/dh2 = (1, -1) -> * [z2 > 0] = (1, -1) -> W2^T = (2, -1) -> * [z1 > 0] = (0, -1)
              -> W1^T: dx = (-1, -1);
      guided: (1, -1) -> * [z2 > 0][g > 0] = (1, 0) -> W2^T = (1, 1) -> * [z1 > 0][g > 0] = (0, 1)
              -> W1^T: dx = (1, 1).
    Class 1, W3[1] = (2, 1): every gradient is positive, guided = plain:
      (2, 1) -> W2^T = (1, 4) -> (0, 4) -> dx = (4, 4).
    Grad-CAM at h2 (1x1: alpha = W3[c]): L^0 = ReLU(3 - 6) = 0, L^1 = ReLU(6 + 6) = 12.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1, bias=False).double()
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False).double()
        self.fc = nn.Linear(2, 2, bias=False).double()
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]])[:, :, None, None])
            self.conv2.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0]])[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))

    def forward(self, x):
        self.h2 = F.relu(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.h2.flatten(1))


def test_hand_computed_guided_gradients_and_guided_grad_cam():
    model = HandNet().eval()
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    got = gradcam_ref.explain(model, x, [[0, 1]], layer="conv2", guided=True)
    assert got.guided_backprop.shape == (1, 2, 2, 1, 1)
    expected = torch.tensor([[[1.0, 1.0], [4.0, 4.0]]], dtype=torch.float64)[..., None, None]
    torch.testing.assert_close(got.guided_backprop, expected, rtol=0, atol=0)
    torch.testing.assert_close(got.maps, torch.tensor([[[[0.0]], [[12.0]]]], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(got.guided_grad_cam, expected * torch.tensor([0.0, 12.0]).reshape(1, 2, 1, 1, 1),
                               rtol=0, atol=0)
    plain = torch.autograd.functional.jacobian(lambda v: model(v)[0, 0], x)
    torch.testing.assert_close(plain, -torch.ones_like(x), rtol=0, atol=0)  # the model is unchanged


# --- agreement with the explicit reference ---------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3), kind=st.sampled_from(["none", "ints", "multi", "callable"]))
def test_mixed_relu_forms_match_the_explicit_reference(seed, n, kind):
    model = MixedNet(seed % 1000).double().eval()
    x = torch.as_tensor(np.random.default_rng(seed).standard_normal((n, 3, 7, 7)))
    rng = np.random.default_rng(seed + 1)
    target = {
        "none": None,
        "ints": rng.integers(0, 4, size=n),
        "multi": rng.integers(0, 4, size=(n, 3)),
        "callable": lambda s: s[:, 1] - 0.5 * s[:, 3],
    }[kind]
    got = gradcam_ref.explain(model, x, target, layer="conv2", guided=True)

    if kind == "callable":
        seeds = torch.zeros(1, n, 4, dtype=torch.float64)
        seeds[0, :, 1], seeds[0, :, 3] = 1.0, -0.5
    else:
        seeds = one_hot(got.targets, 4)
    want = reference_guided(model, x, seeds)
    if kind != "multi":
        want = want[:, 0]
    assert got.guided_backprop.shape == want.shape
    # (guided gradients can be exactly zero: then they must be exactly zero here too)
    torch.testing.assert_close(got.guided_backprop, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    # Guided Grad-CAM: the torch product with torch's own bilinear upsampling.
    maps = got.maps if kind == "multi" else got.maps[:, None]
    up = F.interpolate(maps, size=(7, 7), mode="bilinear", align_corners=False)
    expected = got.guided_backprop * (up[:, :, None] if kind == "multi" else up)
    torch.testing.assert_close(got.guided_grad_cam, expected, rtol=1e-12, atol=1e-14)


def test_every_relu_form_is_guided_and_counted():
    model = MixedNet(1).double().eval()
    x = inputs_for(1, n=2, size=7)
    leaf = x.clone().requires_grad_(True)
    seen = []
    handle = model.relu6.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        with torch_backend.GuidedReLUs() as mode:
            scores = model(leaf)
    finally:
        handle.remove()
    assert dict(mode.counts) == MIXED_FORMS
    assert (seen[0] == 6).any() and ((seen[0] > 0) & (seen[0] < 6)).any()  # both bounds of ReLU6 matter
    guided = torch.autograd.grad(scores[:, 0].sum(), leaf)[0]
    plain = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)[0]
    want = reference_guided(model, x, one_hot(np.zeros(2, dtype=int), 4))[:, 0]
    torch.testing.assert_close(guided, want, rtol=0, atol=1e-12)
    assert float((guided - plain).abs().max()) > 1e-3  # guiding changed the gradient


RELU_FORMS = [  # (name counted, cap, the call on a fresh tensor v)
    ("relu", None, lambda v: F.relu(v)),
    ("relu", None, lambda v: F.relu(input=v, inplace=True)),
    ("relu", None, lambda v: F.relu_(v)),
    ("relu", None, lambda v: torch.relu_(v)),
    ("relu", None, lambda v: nn.ReLU(inplace=True)(v)),
    ("relu6", 6.0, lambda v: F.relu6(v, inplace=True)),
    ("relu6", 6.0, lambda v: torch._C._nn.relu6(v)),
    ("hardtanh", 6.0, lambda v: nn.ReLU6()(v)),
    ("hardtanh", 3.0, lambda v: nn.Hardtanh(0.0, 3.0)(v)),
    ("hardtanh", 2.0, lambda v: F.hardtanh_(v, 0, 2.0)),
    ("hardtanh", None, lambda v: F.hardtanh(v, min_val=0.0, max_val=math.inf)),
    ("threshold", None, lambda v: F.threshold(v, 0.0, 0.0)),
    ("threshold", None, lambda v: nn.Threshold(0, 0, inplace=True)(v)),
    ("threshold", None, lambda v: torch.threshold_(v, 0, 0)),
    ("clamp", None, lambda v: torch.clamp(v, min=0)),
    ("clamp", 6.0, lambda v: torch.clip(v, 0, 6)),
    ("clamp", 2.5, lambda v: v.clamp(max=2.5, min=0.0)),
    ("clamp", 6.0, lambda v: v.clip_(np.float64(0.0), 6)),
    ("clamp", None, lambda v: torch.clamp_min(v, 0)),
    ("clamp", None, lambda v: v.clamp_min_(0.0)),
]


@pytest.mark.parametrize(("name", "cap", "call"), RELU_FORMS)
def test_each_relu_form_matches_the_reference(name, cap, call):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    w, w2 = torch.randn(6, 6, dtype=torch.float64, generator=gen), torch.randn(6, 3, dtype=torch.float64, generator=gen)
    seed = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    with torch_backend.GuidedReLUs() as mode:
        y = call(4.0 * (x @ w)) @ w2
    assert dict(mode.counts) == {name: 1}
    (got,) = torch.autograd.grad(y, x, seed)
    z = 4.0 * (x @ w)
    assert (z > 0).any() and (z < 0).any() and (cap is None or (z > cap).any())
    ref = (RefGuidedReLU.apply(z) if cap is None else RefGuidedReLU.apply(z, cap)) @ w2
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # the forward numbers are the original's
    (want,) = torch.autograd.grad(ref, x, seed)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_forms_that_are_not_relus_keep_their_gradient():
    """leaky ReLU, clamp(-1, ...), hardtanh(-1, 1), threshold(0.5, 0) and a tensor bound are not guided."""
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def net(v):
        return (F.leaky_relu(v @ w) + (v @ w).clamp(min=-1.0) + F.hardtanh(v @ w) + F.threshold(v @ w, 0.5, 0.0)
                + (v @ w).clamp(min=torch.zeros(()))) @ w

    plain = torch.autograd.grad(net(x).sum(), x)[0]
    with torch_backend.GuidedReLUs() as mode:
        y = net(x)
    assert not mode.counts
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], plain, rtol=0, atol=0)


def test_matches_the_numpy_oracle_by_hand():
    for head in ("gap", "gap-mlp", "flatten"):
        oracle, model = small_net(30, head=head)
        x = inputs_for(30, n=3)
        target = [[0, 4], [1, 2], [3, 3]]
        got = gradcam_ref.explain(model, x, target, layer="relu0", guided=True).numpy()
        want = gradcam_ref.explain(oracle, x.numpy(), target, layer="relu0", guided=True)
        scale = float(np.abs(want.guided_backprop).max())
        assert scale > 0
        np.testing.assert_allclose(got.guided_backprop, want.guided_backprop, rtol=0, atol=1e-10 * scale, err_msg=head)
        np.testing.assert_allclose(got.guided_grad_cam, want.guided_grad_cam, rtol=0,
                                   atol=1e-10 * float(np.abs(want.guided_grad_cam).max()), err_msg=head)


# --- third-party references ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations")
def test_matches_captum_guided_backprop_on_relu_modules():
    from captum.attr import GuidedBackprop

    oracle, model = small_net(31, head="gap-mlp")
    plain = torch_oracle(oracle, torch.float64, inplace=False)  # captum's hooks need it
    x = inputs_for(31, n=4)
    target = [0, 1, 4, 2]
    ours = gradcam_ref.explain(model, x, target, layer="relu1", guided=True).guided_backprop
    theirs = GuidedBackprop(plain).attribute(x, target=target).detach()
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_matches_pytorch_grad_cam_on_its_first_example():
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel

    oracle, model = small_net(32, head="gap-mlp")
    x = inputs_for(32, n=2)
    ours = gradcam_ref.explain(model, x, [3, 1], layer="relu1", guided=True).guided_backprop
    theirs = GuidedBackpropReLUModel(torch_oracle(oracle, torch.float64, inplace=False), device="cpu")(
        x[:1].clone(), target_category=3)  # (H, W, C) of example 0 only (pytorch-grad-cam #400, #530)
    torch.testing.assert_close(ours[0].permute(1, 2, 0), torch.as_tensor(theirs), rtol=1e-10, atol=1e-12)


# --- batches, targets ------------------------------------------------------------------------------


def test_each_example_and_target_is_its_own():
    model = MixedNet(2).double().eval()
    x = inputs_for(2, n=3, size=7)
    targets = np.array([[0, 3], [1, 1], [2, 0]])
    multi = gradcam_ref.explain(model, x, targets, layer="conv3", guided=True)
    assert multi.guided_backprop.shape == (3, 2, 3, 7, 7) and multi.guided_grad_cam.shape == (3, 2, 3, 7, 7)
    for i in range(3):
        for t in range(2):
            alone = gradcam_ref.explain(model, x[i:i + 1], [targets[i, t]], layer="conv3", guided=True)
            torch.testing.assert_close(multi.guided_backprop[i, t], alone.guided_backprop[0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(multi.guided_grad_cam[i, t], alone.guided_grad_cam[0], rtol=1e-12, atol=1e-14)


def test_multi_target_fallback_when_vmap_fails(monkeypatch):
    model = MixedNet(3).double().eval()
    x = inputs_for(3, n=2, size=7)
    targets = [[0, 1], [2, 3]]
    batched = gradcam_ref.explain(model, x, targets, layer="conv3", guided=True)
    grad = torch.autograd.grad

    def no_vmap(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("Batching rule not implemented")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = gradcam_ref.explain(model, x, targets, layer="conv3", guided=True)
    torch.testing.assert_close(looped.guided_backprop, batched.guided_backprop, rtol=1e-12, atol=1e-14)


def test_split_form_and_default_off():
    _, model = small_net(33, head="gap-mlp")
    x = inputs_for(33)
    hooked = gradcam_ref.explain(model, x, [1, 2, 3], layer="relu1", guided=True)
    split = gradcam_ref.explain((model[:-1], model.head), x, [1, 2, 3], guided=True)
    torch.testing.assert_close(split.guided_backprop, hooked.guided_backprop, rtol=0, atol=0)
    torch.testing.assert_close(split.guided_grad_cam, hooked.guided_grad_cam, rtol=0, atol=0)
    off = gradcam_ref.explain(model, x, [1, 2, 3], layer="relu1")
    assert off.guided_backprop is None and off.guided_grad_cam is None
    torch.testing.assert_close(off.maps, hooked.maps, rtol=0, atol=0)


# --- the model and torch are left as they were ----------------------------------------------------


def test_ordinary_gradients_are_exactly_as_before():
    model = MixedNet(4).double().eval()
    x = inputs_for(4, n=2, size=7)

    def plain_gradient():
        leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(leaf)[:, 2].sum(), leaf)[0]

    before = plain_gradient()
    state = model_state(model)
    gradcam_ref.explain(model, x, 2, layer="conv2", guided=True)
    torch.testing.assert_close(plain_gradient(), before, rtol=0, atol=0)
    assert_same_state(state, model_state(model))
    assert torch._C._len_torch_function_stack() == 0


class _FailsAfterAReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.fail = False

    def forward(self, x):
        a = F.relu(self.conv(x))
        if self.fail and torch.is_grad_enabled() and x.requires_grad:  # only in the guided pass
            raise KeyError("inside the guided pass")
        return self.fc(a.mean((2, 3)))


def test_state_restored_when_the_guided_pass_raises():
    model = _FailsAfterAReLU().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model_state(model)
    stack, grad_mode = torch._C._len_torch_function_stack(), torch.is_grad_enabled()
    model.fail = True
    with pytest.raises(KeyError, match="inside the guided pass"):
        gradcam_ref.explain(model, x, layer="conv", guided=True)

    calls = []

    def bad_target(scores):  # works in the Grad-CAM pass, raises in the guided pass
        calls.append(len(calls))
        if len(calls) == 2:
            raise ValueError("in the target, guided pass")
        return scores[:, 0]

    model.fail = False
    with pytest.raises(ValueError, match="in the target, guided pass"):
        gradcam_ref.explain(model, x, bad_target, layer="conv", guided=True)
    assert calls == [0, 1]
    assert torch._C._len_torch_function_stack() == stack == 0
    assert torch.is_grad_enabled() == grad_mode
    assert_same_state(before, model_state(model))
    leaf = torch.full((1, 4), -1.0, requires_grad=True)
    (g,) = torch.autograd.grad((F.relu(leaf) - F.relu(-leaf)).sum(), leaf)
    torch.testing.assert_close(g, torch.ones(1, 4))  # ReLU's ordinary gradient, negative seed passes


def test_an_inplace_relu_on_the_inputs_runs_on_a_copy():
    """An in-place op on the leaf that the guided gradient is taken for would be an autograd error."""
    torch.manual_seed(35)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    model = model.double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    negative = x < 0
    got = gradcam_ref.explain(model, x.clone(), [0, 1], layer="1", guided=True)
    assert (got.guided_backprop[negative] == 0).all() and (got.guided_backprop != 0).any()


# --- warnings and errors --------------------------------------------------------------------------


def test_no_relu_warns_and_gives_the_plain_gradient():
    torch.manual_seed(34)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with pytest.warns(gradcam_ref.NoGuidedReLUWarning, match="no ReLU"):
        got = gradcam_ref.explain(model, x, [0, 2], layer="1", guided=True)
    leaf = x.clone().requires_grad_(True)
    scores = model(leaf)
    plain = torch.autograd.grad(scores[0, 0] + scores[1, 2], leaf)[0]
    torch.testing.assert_close(got.guided_backprop, plain, rtol=1e-12, atol=1e-14)


def test_integer_inputs_are_refused_for_guided():
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, tokens):
            return self.fc(F.relu(self.conv(self.embed(tokens).transpose(1, 2))).mean(2))

    model = Embed().eval()
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gradcam_ref.explain(model, tokens, layer="conv")  # Grad-CAM itself works
    with pytest.raises(TypeError, match="guided=True.*inputs, which must be floating, got torch.int64"):
        gradcam_ref.explain(model, tokens, layer="conv", guided=True)


# --- EfficientNet-Lite0: ReLU6 everywhere ----------------------------------------------------------


class _Ref6(nn.Module):
    def forward(self, x):
        return ref_relu6(x)


def test_efficientnet_lite0_every_relu6_is_guided():
    from gradcam_ref.zoo import efficientnet_lite0

    model = efficientnet_lite0.load_torch()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in model.modules() if isinstance(m, nn.ReLU6)]
    leaf = x.clone().requires_grad_(True)
    try:
        with torch_backend.GuidedReLUs() as mode:
            scores = model(leaf)
    finally:
        for handle in handles:
            handle.remove()
    # stem + head (one shared module), and 16 blocks: an expansion ReLU6 in all but the first,
    # a depthwise ReLU6 in each.
    assert calls[0] == 33 == 2 + 15 * 2 + 1
    assert dict(mode.counts) == {"hardtanh": 33}
    targets = scores.argmax(1).tolist()

    before = model_state(model)
    got = gradcam_ref.explain(model, x, np.array([targets, [5, 7]]).T, layer="_conv_head", guided=True)
    assert_same_state(before, model_state(model))
    assert got.guided_backprop.shape == (2, 2, 3, 224, 224) and got.guided_grad_cam.shape == (2, 2, 3, 224, 224)

    reference = copy.deepcopy(model)
    for module in reference.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, _Ref6())
    leaf = x.clone().requires_grad_(True)
    scores = reference(leaf)
    for t, column in enumerate([targets, [5, 7]]):
        seed = F.one_hot(torch.tensor(column), 1000).to(scores.dtype)
        want = torch.autograd.grad(scores, leaf, seed, retain_graph=True)[0]
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got.guided_backprop[:, t], want, rtol=0, atol=1e-5 * scale)


# --- CUDA -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="platform limit: no CUDA device on this machine")
def test_cuda_guided_stays_on_the_device():
    model = MixedNet(5).double().eval()
    x = inputs_for(5, n=2, size=7)
    targets = [[0, 1], [2, 3]]
    cpu = gradcam_ref.explain(model, x, targets, layer="conv2", guided=True)
    before = model_state(model.cuda())
    gpu = gradcam_ref.explain(model, x.cuda(), targets, layer="conv2", guided=True)
    for field in ("guided_backprop", "guided_grad_cam"):
        assert getattr(gpu, field).device.type == "cuda", field
        torch.testing.assert_close(getattr(gpu, field).cpu(), getattr(cpu, field), rtol=1e-10, atol=1e-12)
    assert_same_state(before, model_state(model))
