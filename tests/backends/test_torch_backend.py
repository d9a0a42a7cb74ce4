"""The torch backend against identities, the NumPy oracle, captum and plain autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradcam_ref.backends import numpy_backend
from gradcam_ref.backends.numpy_backend import Oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from tests.backends.torch_nets import assert_same_state, model_state, torch_from_oracle

# --- helpers ------------------------------------------------------------------------------------


def small_net(seed: int = 0, head: str = "gap", dtype=torch.float64, rank: int = 2, size: int = 9):
    """A 2-conv oracle network and its torch twin (ReLU(inplace=True))."""
    oracle = Oracle.random(
        np.random.default_rng(seed), in_channels=3, widths=[4, 6], kernel_sizes=[3, 2], num_classes=5,
        spatial_rank=rank, head=head, input_size=size,
    )
    return oracle, torch_from_oracle(oracle, dtype)


def inputs_for(seed: int, n: int = 3, size: int = 9, rank: int = 2, dtype=torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed + 1000)
    return torch.as_tensor(rng.standard_normal((n, 3) + (size,) * rank), dtype=dtype)


def autograd_reference(model: nn.Module, layer: str, x: torch.Tensor, score) -> tuple[torch.Tensor, ...]:
    """A and d score.sum() / dA by plain autograd through the whole model (no backend code)."""
    store = {}

    def keep(module, args, output):
        store["a"] = output
        return output.clone()  # like the backend: in-place ops after it leave it alone

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            scores = model(x.clone().requires_grad_(True))
            (grad,) = torch.autograd.grad(score(scores).sum(), store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grad


def reference_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. 1 and 2 written out in torch."""
    alpha = g.flatten(2).mean(dim=2)  # (N, K)
    return torch.relu(torch.einsum("nk,nk...->n...", alpha, a))


# --- exactness: GAP identity and the NumPy oracle ----------------------------------------------


@st.composite
def gap_nets(draw):
    rank = draw(st.sampled_from([1, 2]))
    depth = draw(st.integers(1, 3))
    kernels = draw(st.lists(st.integers(1, 3), min_size=depth, max_size=depth))
    widths = draw(st.lists(st.integers(1, 5), min_size=depth, max_size=depth))
    size = sum(k - 1 for k in kernels) + draw(st.integers(1, 4))
    return dict(
        seed=draw(st.integers(0, 2**31)), rank=rank, widths=widths, kernels=kernels, size=size,
        n=draw(st.integers(1, 3)), classes=draw(st.integers(1, 6)), in_channels=draw(st.integers(1, 3)),
    )


@settings(max_examples=10)
@given(gap_nets(), st.sampled_from([torch.float64, torch.float32]))
def test_gap_net_maps_are_relu_cam_over_z_and_match_the_oracle(spec, dtype):
    rng = np.random.default_rng(spec["seed"])
    oracle = Oracle.random(
        rng, in_channels=spec["in_channels"], widths=spec["widths"], kernel_sizes=spec["kernels"],
        num_classes=spec["classes"], spatial_rank=spec["rank"],
    )
    model = torch_from_oracle(oracle, dtype)
    x64 = rng.standard_normal((spec["n"], spec["in_channels"]) + (spec["size"],) * spec["rank"])
    layer = f"relu{len(spec['widths']) - 1}"
    target = rng.integers(0, spec["classes"], size=spec["n"])

    got = gradcam_ref.explain(model, torch.as_tensor(x64, dtype=dtype), target, layer=layer).numpy()

    outputs, _ = oracle.forward(x64)
    a = outputs[layer]
    z = math.prod(a.shape[2:])
    w = oracle.head_params[0][0][target]  # (N, K): the linear row of each example's class
    expected = np.maximum(gradcam_ref.cam(a, w), 0.0) / z
    oracle_maps = gradcam_ref.explain(oracle, x64, target, layer=layer).maps
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(got.maps, expected, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(oracle_maps, expected, rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(got.targets, target)


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**31),
    head=st.sampled_from(numpy_backend.HEADS),
    layer=st.sampled_from(["conv0", "relu0", "conv1", "relu1"]),
    multi=st.booleans(),
)
def test_every_layer_and_head_matches_the_numpy_oracle(seed, head, layer, multi):
    oracle, model = small_net(seed, head)
    x = inputs_for(seed)
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, size=(3, 2)) if multi else rng.integers(0, 5, size=3)

    got = gradcam_ref.explain(model, x, target, layer=layer).numpy()
    want = gradcam_ref.explain(oracle, x.numpy(), target, layer=layer)

    for field in ("maps", "activations", "gradients", "weights", "scores"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-10, atol=1e-12,
                                   err_msg=field)


# --- targets ------------------------------------------------------------------------------------


def test_none_target_is_the_argmax_and_int_broadcasts():
    _, model = small_net(1)
    x = inputs_for(1, n=4)
    got = gradcam_ref.explain(model, x, layer="relu1")
    argmax = model(x).argmax(dim=1).numpy()
    np.testing.assert_array_equal(got.targets, argmax)
    same = gradcam_ref.explain(model, x, torch.as_tensor(argmax), layer="relu1")
    torch.testing.assert_close(got.maps, same.maps, rtol=0, atol=0)
    assert gradcam_ref.explain(model, x, 3, layer="relu1").targets.tolist() == [3, 3, 3, 3]


def test_multi_target_equals_single_calls():
    _, model = small_net(2, head="flatten")
    x = inputs_for(2, n=3)
    targets = np.array([[0, 4, 2], [1, 1, 3], [4, 0, 0]])
    multi = gradcam_ref.explain(model, x, targets, layer="conv1")
    assert multi.maps.shape == (3, 3, 6, 6) and multi.gradients.shape == (3, 3, 6, 6, 6)
    for t in range(3):
        single = gradcam_ref.explain(model, x, targets[:, t], layer="conv1")
        torch.testing.assert_close(multi.maps[:, t], single.maps, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(multi.gradients[:, t], single.gradients, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(multi.weights[:, t], single.weights, rtol=1e-12, atol=1e-14)


def test_each_example_ignores_the_rest_of_the_batch():
    _, model = small_net(3, head="gap-mlp")
    x = inputs_for(3, n=4)
    batch = gradcam_ref.explain(model, x, [0, 1, 2, 3], layer="relu0")
    for i in range(4):
        alone = gradcam_ref.explain(model, x[i:i + 1], [i], layer="relu0")
        torch.testing.assert_close(batch.maps[i:i + 1], alone.maps, rtol=1e-12, atol=1e-14)


def test_callable_target_equals_autograd_reference():
    _, model = small_net(4, head="flatten")
    x = inputs_for(4, n=3)

    def score(s):  # a differentiable non-class score: a margin, then its negation
        return s[:, 2] - torch.logsumexp(s[:, [0, 1, 3]], dim=1)

    for target in (score, lambda s: -score(s)):
        got = gradcam_ref.explain(model, x, target, layer="conv1")
        a, g = autograd_reference(model, "conv1", x, target)
        assert got.targets is None
        torch.testing.assert_close(got.activations, a, rtol=0, atol=0)
        torch.testing.assert_close(got.gradients, g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.maps, reference_map(a, g), rtol=1e-12, atol=1e-14)


def test_single_logit_binary_head_and_counterfactual():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1)).double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    pos = gradcam_ref.explain(model, x, lambda s: s[:, 0], layer="1")
    neg = gradcam_ref.explain(model, x, lambda s: -s[:, 0], layer="1")
    torch.testing.assert_close(pos.gradients, -neg.gradients, rtol=0, atol=0)
    signed = gradcam_ref.cam(pos.activations, pos.weights)
    torch.testing.assert_close(pos.maps, torch.relu(signed), rtol=0, atol=0)
    torch.testing.assert_close(neg.maps, torch.relu(-signed), rtol=0, atol=0)


# --- layers -------------------------------------------------------------------------------------


def test_layer_by_module_object_and_at_input():
    _, model = small_net(6)
    x = inputs_for(6)
    by_name = gradcam_ref.explain(model, x, layer="relu0")
    by_module = gradcam_ref.explain(model, x, layer=model.relu0)
    torch.testing.assert_close(by_name.maps, by_module.maps, rtol=0, atol=0)
    # the input of conv1 is the output of relu0; the input of relu0 is the output of conv0.
    as_input = gradcam_ref.explain(model, x, layer="conv1", at="input")
    torch.testing.assert_close(as_input.maps, by_name.maps, rtol=0, atol=0)
    before_relu = gradcam_ref.explain(model, x, layer="relu0", at="input")
    conv0 = gradcam_ref.explain(model, x, layer="conv0")
    torch.testing.assert_close(before_relu.activations, conv0.activations, rtol=0, atol=0)
    torch.testing.assert_close(before_relu.maps, conv0.maps, rtol=0, atol=0)
    assert (before_relu.activations < 0).any()  # captured before the in-place ReLU ran


def test_split_form_equals_hooked_model():
    _, model = small_net(7, head="gap-mlp")
    x = inputs_for(7)
    hooked = gradcam_ref.explain(model, x, [1, 2, 3], layer="relu1")
    split = gradcam_ref.explain((model[:-1], model.head), x, [1, 2, 3])
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        torch.testing.assert_close(getattr(split, field), getattr(hooked, field), rtol=0, atol=0)


def test_backend_detected_and_forced():
    _, model = small_net(8)
    x = inputs_for(8)
    forced = gradcam_ref.explain(model, x, layer="relu1", backend="torch")
    detected = gradcam_ref.explain(model, x, layer="relu1")
    assert isinstance(detected.maps, torch.Tensor)
    torch.testing.assert_close(forced.maps, detected.maps, rtol=0, atol=0)


# --- the model is left alone --------------------------------------------------------------------


def test_model_untouched_after_many_calls_including_failures():
    _, model = small_net(9)
    model.conv0.weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    x = inputs_for(9, n=2)
    before = model_state(model)
    grad_mode = torch.is_grad_enabled()

    def failing_target(scores):
        raise KeyError("from the target")

    calls = [
        lambda: gradcam_ref.explain(model, x, layer="relu1"),
        lambda: gradcam_ref.explain(model, x, [[0, 1], [2, 3]], layer="conv1"),
        lambda: gradcam_ref.explain(model, x, lambda s: s[:, 0], layer="relu0", at="input"),
        lambda: gradcam_ref.explain(model, x, 7, layer="relu1"),  # target out of range
        lambda: gradcam_ref.explain(model, x, failing_target, layer="relu1"),
        lambda: gradcam_ref.explain(model, x[0], layer="relu1"),  # wrong rank: the model raises
        lambda: gradcam_ref.explain(model, x, layer="relu9"),
    ]
    failures = 0
    for i in range(1000):
        try:
            calls[i % len(calls)]()
        except (ValueError, TypeError, KeyError, RuntimeError):
            failures += 1
    assert failures == sum(i % len(calls) >= 3 for i in range(1000))
    assert torch.is_grad_enabled() == grad_mode
    assert_same_state(before, model_state(model))


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_layer_lists_close_matches():
    _, model = small_net(10)
    with pytest.raises(ValueError, match=r"'relu3' is not a submodule of Sequential; did you mean") as error:
        gradcam_ref.explain(model, inputs_for(10), layer="relu3")
    assert "'relu0'" in str(error.value) and "'relu1'" in str(error.value)
    assert "'head'" not in str(error.value)
    with pytest.raises(ValueError, match="layer is required"):
        gradcam_ref.explain(model, inputs_for(10))
    with pytest.raises(ValueError, match="not a submodule"):
        gradcam_ref.explain(model, inputs_for(10), layer=nn.ReLU())


def test_target_out_of_range():
    _, model = small_net(11)
    with pytest.raises(ValueError, match=r"target out of range.*C = 5.*\[5\]"):
        gradcam_ref.explain(model, inputs_for(11), [0, 5, 1], layer="relu1")


class _WithUnused(nn.Module):
    """A net with a submodule that its forward pass never calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.unused = nn.ReLU()

    def forward(self, x):
        return self.net(x)


def test_layer_never_reached():
    _, model = small_net(12)
    with pytest.raises(ValueError, match="layer 'unused' never ran"):
        gradcam_ref.explain(_WithUnused(model).eval(), inputs_for(12), layer="unused")


def test_score_independent_of_layer_is_an_error():
    _, model = small_net(13)
    with pytest.raises(ValueError, match="does not depend on the output of layer 'relu1'"):
        gradcam_ref.explain(model, inputs_for(13), lambda s: torch.zeros(3, dtype=s.dtype), layer="relu1")
