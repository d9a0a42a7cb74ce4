"""The torch backend against identities, the NumPy oracle, captum and plain autograd."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from gradcam_ref.backends import numpy_backend
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.backends.torch import _backward, _state
from gradcam_ref.verify.twins import torch_oracle
from tests.backends.torch_nets import assert_same_state, model_state, one_thread  # noqa: F401  (autouse)

# --- helpers ------------------------------------------------------------------------------------


def small_net(seed: int = 0, head: str = "gap", dtype=torch.float64, rank: int = 2, size: int = 9):
    """A 2-conv oracle network and its torch twin (ReLU(inplace=True))."""
    oracle = Oracle.random(
        np.random.default_rng(seed), in_channels=3, widths=[4, 6], kernel_sizes=[3, 2], num_classes=5,
        spatial_rank=rank, head=head, input_size=size,
    )
    return oracle, torch_oracle(oracle, dtype)


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
@example(dict(seed=10412, rank=1, widths=[3, 4], kernels=[3, 2], size=5, n=1, classes=1, in_channels=1),
         torch.float32)
def test_gap_net_maps_are_relu_cam_over_z_and_match_the_oracle(spec, dtype):
    rng = np.random.default_rng(spec["seed"])
    oracle = Oracle.random(
        rng, in_channels=spec["in_channels"], widths=spec["widths"], kernel_sizes=spec["kernels"],
        num_classes=spec["classes"], spatial_rank=spec["rank"],
    )
    model = torch_oracle(oracle, dtype)
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
    # rounding is relative to the terms summed, not to their (possibly cancelling) sum: the scale is
    # sum_k |w_k| |A^k| / Z (float32 failed 1e-5 of the map's max at 1.5e-5 on seed 10412, widths [3, 4])
    scale = max(float((gradcam_ref.cam(np.abs(a), np.abs(w)) / z).max()), 1e-30)
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
    # A NumPy score has no graph: named, not torch's "ones_like(): argument 'input' must be Tensor".
    with pytest.raises(TypeError, match=r"callable target must return an array of the scores' library "
                                        r"\(torch.Tensor\) computed from them, got numpy.ndarray"):
        gradcam_ref.explain(model, x, lambda s: s.detach().numpy()[:, 0], layer="conv1")


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


class _Segmenter(nn.Module):
    """Fully convolutional: scores (N, C, H', W'), one map per class and pixel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(25)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                                  nn.ReLU())
        self.classify = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.classify(self.body(x))


def test_segmentation_region_and_regression_scores():
    model = _Segmenter().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    region = torch.zeros(6, 6, dtype=torch.float64)
    region[1:4, 2:5] = 1.0

    def region_score(s):  # class 1's summed score over a region: (N,)
        return (s[:, 1] * region).sum(dim=(1, 2))

    got = gradcam_ref.explain(model, x, region_score, layer="body.2")
    a, g = autograd_reference(model, "body.2", x, region_score)
    torch.testing.assert_close(got.gradients, g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.maps, reference_map(a, g), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"scores\) must have shape \(N, C\).*callable"):
        gradcam_ref.explain(model, x, 1, layer="body.2")

    regression = nn.Sequential(model.body, nn.Flatten(), nn.Linear(6 * 36, 1), nn.Flatten(0)).double().eval()
    got = gradcam_ref.explain(regression, x, lambda y: y, layer="0.2")
    a, g = autograd_reference(regression, "0.2", x, lambda y: y)
    torch.testing.assert_close(got.maps, reference_map(a, g), rtol=1e-12, atol=1e-14)
    assert got.scores.shape == (2,)


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
    _, model = small_net(9, head="flatten")
    model.conv0.weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    x = inputs_for(9, n=2)
    wider = inputs_for(9, n=2, size=10)
    before = model_state(model)
    grad_mode = torch.is_grad_enabled()

    def failing_target(scores):
        raise KeyError("from the target")

    calls = [  # three that work, then five that fail at different points
        lambda: gradcam_ref.explain(model, x, layer="relu1"),
        lambda: gradcam_ref.explain(model, x, [[0, 1], [2, 3]], layer="conv1"),
        lambda: gradcam_ref.explain(model, x, lambda s: s[:, 0], layer="relu0", at="input"),
        lambda: gradcam_ref.explain(model, x, 7, layer="relu1"),  # target out of range
        lambda: gradcam_ref.explain(model, x, failing_target, layer="relu1"),  # in the target
        lambda: gradcam_ref.explain(model, wider, layer="relu0"),  # in the head, after the layer
        lambda: gradcam_ref.explain(model, x[None], layer="relu1"),  # in the model, before it
        lambda: gradcam_ref.explain(model, x, layer="relu9"),  # unknown layer
    ]
    failures = 0
    for i in range(1000):
        try:
            calls[i % len(calls)]()
        except (ValueError, TypeError, KeyError, RuntimeError):
            failures += 1
    assert failures == 1000 * 5 // 8
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


def test_wrong_input_rank():
    _, model = small_net(14)
    x = inputs_for(14, n=3)
    with pytest.raises(ValueError, match=r"not a batch of N = 3 examples like inputs \(3, 9, 9\).*rank"):
        gradcam_ref.explain(model, x[0], layer="relu1")  # (C, H, W): conv2d takes it as unbatched
    with pytest.raises(RuntimeError) as error:
        gradcam_ref.explain(model, x[None], layer="relu1")  # (1, N, C, H, W): conv2d refuses it
    assert any("inputs of shape (1, 3, 3, 9, 9)" in note for note in error.value.__notes__)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        gradcam_ref.explain(model, x.numpy(), layer="relu1", backend="torch")


def test_numerically_zero_gradients_warn_per_example():
    _, model = small_net(15)
    x = inputs_for(15, n=3)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    with pytest.warns(gradcam_ref.ZeroGradientWarning, match=r"exactly zero for example \[1\]"):
        got = gradcam_ref.explain(model, x, lambda s: s[:, 0] * mask, layer="relu1")
    assert float(got.maps[1].abs().max()) == 0.0 and float(got.maps.abs().max()) > 0
    _, model = small_net(15, head="flatten")
    with torch.no_grad():
        model.head[1].weight[3] = 0.0  # class 3 ignores the features
    with pytest.warns(gradcam_ref.ZeroGradientWarning, match=r"\(example, target\) \[\(0, 1\)\]:"):
        gradcam_ref.explain(model, x, [[0, 3], [1, 2], [2, 1]], layer="relu1")


def test_zero_mean_gradients_are_not_zero_gradients():
    # The score sum(A * P), P = +1 at one position and -1 at another: dy/dA = P is not zero,
    # yet every alpha_k (its spatial mean) is exactly 0. The check that reads alpha first must
    # then search the gradients, and find them non-zero.
    _, model = small_net(15)
    x = inputs_for(15, n=2)
    features = model[:2]  # conv0, relu0
    with torch.no_grad():
        a = features(x)
    pattern = torch.zeros(a.shape[2:], dtype=a.dtype)
    pattern[0, 0], pattern[-1, -1] = 1.0, -1.0

    class PatternHead(nn.Module):
        def forward(self, a):
            return (a * pattern).sum(dim=(1, 2, 3))[:, None]  # (N, 1) scores

    split = (features, PatternHead().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ZeroGradientWarning)
        got = gradcam_ref.explain(split, x, 0)
        captured = gradcam_ref.backends.torch.capture(split, x, 0)
    torch.testing.assert_close(got.gradients, pattern.expand_as(got.gradients), rtol=0, atol=0)
    assert float(got.weights.abs().max()) == 0.0 and float(got.maps.abs().max()) == 0.0
    torch.testing.assert_close(captured.gradients, got.gradients, rtol=0, atol=0)


def test_capture_alone_warns_for_zero_gradients():
    _, model = small_net(15)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    with pytest.warns(gradcam_ref.ZeroGradientWarning, match=r"exactly zero for example \[1\]") as record:
        captured = gradcam_ref.backends.torch.capture(model, inputs_for(15, n=3), lambda s: s[:, 0] * mask,
                                                      layer="relu1")
    assert float(captured.gradients[1].abs().max()) == 0.0 and float(captured.gradients[0].abs().max()) > 0
    assert record[0].filename == __file__  # the warning points at the caller's line


def _reference_any_training(model: nn.Module) -> bool:
    depends = _state._depends_on_mode
    return any(m.training and depends(m) for m in model.modules())


@settings(max_examples=30)
@given(st.lists(st.booleans(), min_size=9, max_size=9))
def test_training_check_sees_what_a_walk_over_modules_sees(flags):
    shared = nn.ReLU()
    inner = nn.Sequential(nn.Conv2d(1, 1, 1), shared, nn.ModuleList([nn.Dropout(), None, shared]))
    model = nn.Sequential(inner, nn.ModuleDict({"bn": nn.BatchNorm2d(1), "again": inner}), nn.Linear(1, 1))
    model.register_module("absent", None)
    modules = list(model.modules())  # every module once (shared ones too), containers included
    assert len(modules) == len(flags)
    for module, flag in zip(modules, flags, strict=True):
        module.training = flag
    assert (_state._kept_for(model) == "training") is _reference_any_training(model)


def test_training_check_ends_on_a_cycle_of_modules():
    """Containers are expanded once: a module registered inside its own child ends the walk too."""
    dropout = nn.Dropout()
    outer = nn.Sequential(nn.Sequential(nn.ReLU(), dropout))
    for module in outer.modules():  # (outer.eval() itself would recurse forever on the cycle)
        module.training = False
    outer[0].add_module("back", outer)  # outer -> outer[0] -> outer
    assert (_state._kept_for(outer) == "training") is _reference_any_training(outer) is False
    dropout.train()
    assert (_state._kept_for(outer) == "training") is _reference_any_training(outer) is True


def test_training_mode_of_stateless_modules_changes_nothing_and_does_not_warn():
    """Convolutions and ReLUs in training mode compute what they compute in eval mode: no warning
    (training mode with dropout and batch norm: tests/backends/test_torch_reliability.py)."""
    _, model = small_net(16)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gradcam_ref.explain(model, inputs_for(16), layer="relu1")
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(got.maps, gradcam_ref.explain(model.eval(), inputs_for(16), layer="relu1").maps,
                               rtol=0, atol=0)


def test_bad_options():
    _, model = small_net(17)
    x = inputs_for(17)
    with pytest.raises(ValueError, match="at must be one of"):
        gradcam_ref.explain(model, x, layer="relu1", at="middle")
    with pytest.raises(ValueError, match="split form.*leave layer"):
        gradcam_ref.explain((model[:-1], model.head), x, layer="relu1")
    with pytest.raises(TypeError, match="pair"):
        gradcam_ref.explain((model[:2], model[2:4], model[4:]), x)
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(3,\), got shape \(3, 5\)"):
        gradcam_ref.explain(model, x, lambda s: s, layer="relu1")
    with pytest.raises(ValueError, match=r"reshape=\(2, 2\).*\(N, T, D\).*\(3, 6, 6, 6\)"):
        gradcam_ref.explain(model, x, layer="relu1", reshape=(2, 2))
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        gradcam_ref.explain(model, x, layer="relu1")


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = self.conv(x)
        return self.fc(a.mean((2, 3))), a


def test_layer_must_give_one_float_tensor():
    model = nn.Sequential()
    model.add_module("pair", _TupleOut())
    with pytest.raises(TypeError, match="output of layer 'pair' must be one floating-point tensor.*tuple"):
        gradcam_ref.explain(model.eval(), torch.randn(1, 3, 5, 5), layer="pair")


class _MutatesAfterLayer(nn.Module):
    """Calls an in-place ReLU for its side effect, then changes the same tensor again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        self.act(y)  # the return value (the backend's copy) is dropped; y itself is modified
        y.mul_(2.0)
        return self.fc(y.mean((2, 3)))


def test_layer_output_modified_in_place_later_is_an_error():
    with pytest.raises(RuntimeError, match="modified the output of layer 'act' in place"):
        gradcam_ref.explain(_MutatesAfterLayer().eval(), torch.randn(2, 3, 5, 5), layer="act")


def test_explain_under_no_grad_keeps_grad_mode():
    _, model = small_net(18)
    x = inputs_for(18)
    outside = gradcam_ref.explain(model, x, layer="conv1")
    with torch.no_grad():
        inside = gradcam_ref.explain(model, x, layer="conv1")
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside.maps, outside.maps, rtol=0, atol=0)


# --- cost: nothing before the layer is differentiated ------------------------------------------


def test_no_graph_before_the_layer():
    _, model = small_net(19, head="gap-mlp")
    x = inputs_for(19, n=2)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (torch.is_grad_enabled(), output.requires_grad)
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_children()]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gradcam_ref.explain(model, x, layer="conv1")
    finally:
        for handle in handles:
            handle.remove()
    # conv1's own hook (registered first) runs before the backend's: still no grad there.
    assert seen == {"conv0": (False, False), "relu0": (False, False), "conv1": (False, False),
                    "relu1": (True, True), "head": (True, True)}
    # Only the part after the layer keeps tensors for the backward pass: the ReLU's output and
    # the MLP head's small tensors; no input, no conv0/relu0 activation, no conv weight.
    early = {tuple(x.shape), (2, 4, 7, 7), tuple(model.conv0.weight.shape), tuple(model.conv1.weight.shape)}
    assert saved and not early & set(saved)
    assert max(math.prod(s) for s in saved) <= 2 * 6 * 6 * 6


def test_working_memory_is_that_of_the_part_after_the_layer():
    """EfficientNet-Lite0 at its last conv: only the head keeps activations for the backward."""
    from gradcam_ref.zoo import efficientnet_lite0

    model = efficientnet_lite0.load_torch()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    parameters = {p.data_ptr() for p in model.parameters()}

    def saved_bytes(run) -> int:
        """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass."""
        saved = {}

        def pack(t):
            if t.data_ptr() not in parameters:
                saved[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(saved.values())

    ours = saved_bytes(lambda: gradcam_ref.explain(model, x, [1, 2], layer="_conv_head"))
    a_bytes = 2 * 1280 * 7 * 7 * 4
    full = saved_bytes(lambda: model(x))  # any method that runs the whole model with autograd
    assert 0 < ours <= 4 * a_bytes
    assert full > 50 * ours


# --- shared modules, real models -----------------------------------------------------------------


class _SharedAct(nn.Module):
    """One activation module called twice, like EfficientNet's ``_swish``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(20)
        self.conv0 = nn.Conv2d(3, 4, 3)
        self.conv1 = nn.Conv2d(4, 5, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.act(self.conv0(x))
        x = self.act(self.conv1(x))
        return self.fc(x.flatten(2).mean(2))


def test_shared_module_needs_call():
    model = _SharedAct().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 'act' ran 2 times in one forward pass.*call=i"):
        gradcam_ref.explain(model, x, layer="act")
    first = gradcam_ref.explain(model, x, layer="act", call=0)
    torch.testing.assert_close(first.maps, gradcam_ref.explain(model, x, layer="conv1", at="input").maps,
                               rtol=0, atol=0)
    last = gradcam_ref.explain(model, x, layer="act", call=-1)
    torch.testing.assert_close(last.maps, gradcam_ref.explain(model, x, layer="act", call=1).maps,
                               rtol=0, atol=0)
    a = last.activations  # (N, 5, 4, 4): a GAP net from here, so the map is ReLU(CAM) / Z
    w = model.fc.weight.detach()[last.targets]
    expected = torch.relu(torch.einsum("nk,nk...->n...", w, a)) / 16
    torch.testing.assert_close(last.maps, expected, rtol=1e-12, atol=1e-14)
    for call in (2, -3):
        with pytest.raises(ValueError, match=f"call={call} but layer 'act' ran 2 time"):
            gradcam_ref.explain(model, x, layer="act", call=call)


def test_efficientnet_lite0_shared_swish_is_a_gap_net():
    from gradcam_ref.zoo import efficientnet_lite0

    model = efficientnet_lite0.load_torch()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="layer '_swish' ran 2 times"):
        gradcam_ref.explain(model, x, layer="_swish")
    got = gradcam_ref.explain(model, x, [[1, 2], [3, 4]], layer="_swish", call=-1)
    assert got.maps.shape == (2, 2, 7, 7) and got.activations.shape == (2, 1280, 7, 7)
    w = model._fc.weight.detach()[torch.as_tensor(got.targets)]  # (N, T, K)
    expected = torch.relu(torch.einsum("ntk,nk...->nt...", w, got.activations)) / 49
    torch.testing.assert_close(got.maps, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    pooled = gradcam_ref.explain(model, x, [[1, 2], [3, 4]], layer="_avg_pooling", at="input")
    torch.testing.assert_close(pooled.maps, got.maps, rtol=0, atol=0)


def test_torchvision_resnet18_is_a_gap_net_with_shared_inplace_relus():
    import torchvision

    torch.manual_seed(26)
    model = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = model_state(model)
    got = gradcam_ref.explain(model, x, [[0, 9], [4, 4]], layer="layer4")
    assert got.activations.shape == (2, 512, 2, 2)
    w = model.fc.weight.detach()[torch.as_tensor(got.targets)]  # (N, T, K)
    expected = torch.relu(torch.einsum("ntk,nk...->nt...", w, got.activations)) / 4
    torch.testing.assert_close(got.maps, expected, rtol=1e-12, atol=1e-14)
    # The block's ReLU(inplace=True) runs twice per block; its last call gives the block's output.
    with pytest.raises(ValueError, match="layer 'layer4.1.relu' ran 2 times"):
        gradcam_ref.explain(model, x, layer="layer4.1.relu")
    last = gradcam_ref.explain(model, x, [[0, 9], [4, 4]], layer=model.layer4[1].relu, call=-1)
    torch.testing.assert_close(last.maps, got.maps, rtol=0, atol=0)
    assert_same_state(before, model_state(model))


def test_torchvision_densenet121_inplace_relu_after_the_layer():
    """pytorch #61519's model: DenseNet applies F.relu(inplace=True) to the output of features."""
    import torchvision

    torch.manual_seed(27)
    model = torchvision.models.densenet121(weights=None, num_classes=10).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = gradcam_ref.explain(model, x, [3, 7], layer="features")
    a = got.activations  # (N, 1024, 2, 2), before the in-place ReLU
    assert (a < 0).any()
    # y = W mean(relu(A)) + b, so dy/dA = W[c] / Z where A > 0 and 0 elsewhere.
    w = model.classifier.weight.detach()[torch.as_tensor(got.targets)]  # (N, K)
    torch.testing.assert_close(got.gradients, w[:, :, None, None] / 4 * (a > 0), rtol=1e-12, atol=1e-15)


# --- captum as an independent reference ----------------------------------------------------------


@pytest.mark.parametrize("head", ["flatten", "gap-mlp"])
@pytest.mark.parametrize(("layer", "at"), [("conv1", "output"), ("relu0", "output"), ("conv1", "input")])
def test_matches_captum_layer_gradcam(head, layer, at):
    from captum.attr import LayerGradCam

    oracle, model = small_net(21, head=head)
    plain = torch_oracle(oracle, torch.float64, inplace=False)  # captum's hooks need it
    x = inputs_for(21, n=4)
    target = [0, 1, 4, 2]
    ours = gradcam_ref.explain(model, x, target, layer=layer, at=at)
    theirs = LayerGradCam(plain, plain.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=True, attribute_to_layer_input=(at == "input")).detach()
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours.maps, theirs[:, 0], rtol=1e-10, atol=1e-12)


# --- multi-target backward: batched, and the fallback --------------------------------------------


def test_multi_target_fallback_when_vmap_fails(monkeypatch):
    monkeypatch.setattr(_backward, "_SPARSE_SEEDED", frozenset())  # the dense seeds' batched pass
    _, model = small_net(22, head="gap-mlp")
    x = inputs_for(22)
    targets = [[0, 1], [2, 3], [4, 0]]
    batched = gradcam_ref.explain(model, x, targets, layer="relu0")
    grad, used = torch.autograd.grad, []

    def no_vmap(*args, is_grads_batched=False, **kwargs):
        used.append(is_grads_batched)
        if is_grads_batched:
            raise RuntimeError("Batching rule not implemented")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = gradcam_ref.explain(model, x, targets, layer="relu0")
    assert used == [True, False, False]
    torch.testing.assert_close(looped.gradients, batched.gradients, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(looped.maps, batched.maps, rtol=1e-12, atol=1e-14)


# --- vision transformers: token activations ------------------------------------------------------


class _TinyViT(nn.Module):
    """Patch embedding, a class token, two encoder blocks, a linear head on the class token."""

    def __init__(self, dim: int = 8, patch: int = 2, image: int = 8, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(23)
        grid = image // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 1 + grid * grid, dim))
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
            for _ in range(2)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, h*w, D), row-major patches
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens)[:, 0]))


def test_vit_tokens_reshaped_to_a_grid():
    model = _TinyViT().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = gradcam_ref.explain(model, x, [0, 1, 3], layer="blocks.0", reshape=(4, 4))
    assert got.activations.shape == (3, 8, 4, 4) and got.maps.shape == (3, 4, 4)

    a, g = autograd_reference(model, "blocks.0", x, lambda s: s[torch.arange(3), [0, 1, 3]])
    grid = lambda t: t[:, 1:].reshape(len(t), 4, 4, 8).permute(0, 3, 1, 2)  # noqa: E731
    # The backend runs block 0 under no_grad, where torch takes its fused inference path.
    torch.testing.assert_close(got.activations, grid(a), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.gradients, grid(g), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.maps, reference_map(grid(a), grid(g)), rtol=1e-12, atol=1e-14)
    assert float(got.maps.max()) > 0

    by_callable = gradcam_ref.explain(model, x, [0, 1, 3], layer="blocks.0", reshape=grid)
    torch.testing.assert_close(by_callable.maps, got.maps, rtol=0, atol=0)
    multi = gradcam_ref.explain(model, x, [[0, 2], [1, 2], [3, 2]], layer="blocks.0", reshape=(4, 4))
    torch.testing.assert_close(multi.maps[:, 0], got.maps, rtol=1e-12, atol=1e-14)
    multi_callable = gradcam_ref.explain(model, x, [[0, 2], [1, 2], [3, 2]], layer="blocks.0", reshape=grid)
    torch.testing.assert_close(multi_callable.maps, multi.maps, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"needs at least 25 tokens, the layer has T = 17"):
        gradcam_ref.explain(model, x, layer="blocks.0", reshape=(5, 5))


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="platform limit: no CUDA device on this machine")
@pytest.mark.parametrize("multi", [False, True])
def test_cuda_tensors_stay_on_the_device(multi):
    _, model = small_net(24, head="gap-mlp")
    x = inputs_for(24)
    target = [[0, 1], [2, 3], [4, 0]] if multi else [0, 2, 4]
    cpu = gradcam_ref.explain(model, x, target, layer="relu0")
    before = model_state(model.cuda())
    gpu = gradcam_ref.explain(model, x.cuda(), target, layer="relu0")
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        assert getattr(gpu, field).device.type == "cuda", field
        torch.testing.assert_close(getattr(gpu, field).cpu(), getattr(cpu, field), rtol=1e-10, atol=1e-12)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("last", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1), "functional"])
def test_softmax_outputs_warn_and_are_explained_as_they_are(last):
    """Grad-CAM's y^c is the pre-softmax logit: a model ending in a softmax warns (the maps are those of
    its probabilities, as a callable target on the logits would give them); a callable target or a
    logits model does not warn."""
    torch.manual_seed(0)
    logits = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3)).double().eval()

    class Functional(nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.softmax(s, dim=1)

    end = Functional() if last == "functional" else last
    model = nn.Sequential(*logits, end).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(gradcam_ref.ProbabilityScoresWarning, match=r"the scores of Sequential are the (log_)?softmax"):
        got = gradcam_ref.explain(model, x, [0, 2], layer="1")
    same = gradcam_ref.explain(logits, x, lambda s: end(s)[[0, 1], [0, 2]], layer="1")
    torch.testing.assert_close(got.maps, same.maps, rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ProbabilityScoresWarning)
        gradcam_ref.explain(model, x, lambda s: s[:, 0], layer="1")
        gradcam_ref.explain(logits, x, [0, 2], layer="1")
