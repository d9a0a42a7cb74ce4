"""Score-CAM's fused scoring copy (backends/torch/_scoring.py ``fuse``, ``PackedConv2d``).

The fused copy must score like the unfused (eager, folded, channels_last) copy on real
torchvision models (plain, residual, grouped and depthwise convolutions) at every batch size,
never write into its input or into a tensor read later, leave the user's model as it was, and
fall back to the unfused copy when it cannot be built (untraceable model, oneDNN missing), when
its scores differ from the model's, and when a pass raises (a batch size oneDNN refuses). Random
graphs of convolutions, ReLUs, additions and poolings (hypothesis) check the rewrite itself.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from gradcam_ref.backends.torch import _scoring
from tests.backends.torch_nets import (  # noqa: F401  (one_thread: autouse)
    assert_same_state,
    model_state,
    one_thread,
    randomised_batch_norms,
)


def _copy(model: nn.Module) -> nn.Module:
    (copy,), _ = _scoring.scoring_copy((model,), layout=torch.channels_last, fold_batch_norms=True)
    return copy


def _kinds(fused: nn.Module) -> tuple[int, int, int, int]:
    packed = [m for m in fused.modules() if isinstance(m, _scoring.PackedConv2d)]
    return len(packed), sum(m.relu for m in packed), sum(m.residual for m in packed), sum(m.in_place for m in packed)


# --- the fused copy scores like the unfused one -------------------------------------------------

MODELS = {
    # ResNet-18 by hand: 20 convolutions; the stem's and each block's first are read by a ReLU (1 + 8);
    # each block's second by the addition of its identity or downsample branch, then a ReLU (8),
    # all eight written into that branch (a max pooling's or a convolution's fresh output).
    "resnet18": (17, 8, 8),
    "mobilenet_v3_small": None,  # depthwise convolutions, Hardswish, squeeze-excitation
    "regnet_x_400mf": None,  # grouped convolutions and residual additions
}


def _residual_blocks(model: nn.Module) -> int:
    """Blocks that add their input (or its projection) to the output of their last convolution."""
    return sum(getattr(m, "use_res_connect", False) or type(m).__name__ == "ResBottleneckBlock"
               for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_the_fused_copy_scores_like_the_unfused_copy_at_every_batch_size(name):
    torch.manual_seed(0)
    model = randomised_batch_norms(getattr(torchvision.models, name)(weights=None))
    before = model_state(model)
    copy = _copy(model)
    fused = _scoring.fuse(copy)
    assert fused is not None
    packed, relu, residual, in_place = _kinds(fused)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert packed == convolutions
    if MODELS[name] is not None:
        assert (relu, residual, in_place) == MODELS[name]
    else:  # each residual block's last convolution is fused with its addition
        assert residual == _residual_blocks(model) > 0 and relu > 0
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    kept = x.clone()
    with torch.inference_mode():
        for n in (1, 2, 5):  # the last chunk of a Score-CAM call is smaller
            expected, got = copy(x[:n]), fused(x[:n])
            assert got.shape == expected.shape
            assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
            assert torch.equal(x, kept)  # never written into
            assert torch.equal(got, fused(x[:n]))  # deterministic: no state carried between calls
    assert_same_state(before, model_state(model))


# --- what is fused, and where the addition may write ---------------------------------------------


class Residuals(nn.Module):
    """z = conv0(x); h = relu(conv1(z)); y = relu(conv2(h) + z); out = conv3(y) + x [+ z].

    conv2's addition may write into z (a new tensor, not h) unless ``read_later`` reads z again;
    conv3's never writes into x (the input)."""

    def __init__(self, read_later: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv0, self.conv1, self.conv2, self.conv3 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.read_later = read_later

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv0(x)
        h = nn.functional.relu(self.conv1(z))
        y = torch.relu(self.conv2(h) + z)
        out = self.conv3(y) + x
        return out + z if self.read_later else out


class AddsItsInput(nn.Module):
    """relu(conv1(z) + z): the sum must not be written into the convolution's own input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv0, self.conv1, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv0(x)
        return self.relu(self.conv1(z) + z)


@pytest.mark.parametrize(("model", "kinds"), [
    (Residuals(read_later=False), (4, 2, 2, 1)),
    (Residuals(read_later=True), (4, 2, 2, 0)),
    (AddsItsInput(), (2, 1, 1, 0)),
])
def test_the_addition_writes_into_a_tensor_only_when_nothing_reads_it_afterwards(model, kinds):
    model.eval()
    fused = _scoring.fuse(model)
    assert fused is not None
    assert _kinds(fused) == kinds  # (packed, ReLU fused, residual fused, written in place)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last)
    kept = x.clone()
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, kept)


class Broadcast(nn.Module):
    """relu(conv(x) + shift) with ``shift`` (C, 1, 1): an addition the graph cannot tell from a residual."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv, self.shift, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.randn(4, 1, 1)), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x) + self.shift).mean((2, 3)))


def test_a_residual_of_another_shape_raises_and_score_cam_falls_back(caplog):
    model = Broadcast().eval()
    fused = _scoring.fuse(model)
    assert fused is not None and _kinds(fused) == (1, 1, 1, 0)  # a parameter is never written into
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"residual must be float32 of the output's shape \(2, 4, 6, 6\), "
                                         r"got torch.float32 \(4, 1, 1\)"):
        fused(x)
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        fast, plain = (gradcam_ref.explain(model, x, [0, 1], layer="conv", method="score-cam", fuse_convolutions=f)
                       for f in (True, False))
    assert "the fused pass raised ValueError" in caplog.text
    np.testing.assert_array_equal(fast.weights.detach().numpy(), plain.weights.detach().numpy())


def test_convolutions_it_cannot_pack_are_left_as_they_are():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(),  # string padding: left alone
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),  # not zeros: left alone
        nn.Conv2d(4, 4, 1), nn.ReLU(),  # packed, ReLU fused
    ).eval()
    fused = _scoring.fuse(model)
    assert fused is not None and _kinds(fused) == (1, 1, 0, 0)
    assert sum(type(m) is nn.Conv2d for m in fused.modules()) == 2
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
    assert _scoring.fuse(model.double()) is None  # float64: nothing oneDNN packs


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_an_untraceable_model_or_a_torch_without_onednn_is_not_fused(monkeypatch, caplog):
    with caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        assert _scoring.fuse(Untraceable().eval()) is None
    assert "does not trace with torch.fx" in caplog.text and "not fused" in caplog.text
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert _scoring.fuse(model) is not None
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert _scoring.fuse(model) is None
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    monkeypatch.undo()
    hooked[1].register_forward_hook(lambda m, args, out: None)
    assert _scoring.fuse(hooked) is None  # a hook anywhere: the model's own forward


# --- Score-CAM falls back to the unfused copy ---------------------------------------------------


def _score_cam(model, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        return gradcam_ref.explain(model, x, [1, 3], layer="layer3", method="score-cam",
                                   variant="pytorch-grad-cam", **options)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(6)
    model = randomised_batch_norms(torchvision.models.resnet18(weights=None, num_classes=5))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    unfused = _score_cam(model, x, fuse_convolutions=False)
    return model, x, unfused


def _same_maps(e, reference):
    a, b = np.asarray(e.heatmap((32, 32), "pytorch-grad-cam")), np.asarray(reference.heatmap((32, 32), "pytorch-grad-cam"))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_score_cam_fused_is_score_cam_unfused_and_leaves_the_model_as_it_was(resnet):
    model, x, unfused = resnet
    before = model_state(model)
    calls = []
    original = _scoring.PackedConv2d.forward

    def counted(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_scoring.PackedConv2d, "forward", counted)
        e = _score_cam(model, x)
    assert calls and set(calls) >= {2, 8}  # the check on the inputs, then batches of 8
    _same_maps(e, unfused)
    assert_same_state(before, model_state(model))


def test_a_fused_pass_that_raises_falls_back_to_the_unfused_copy_for_good(resnet, caplog):
    model, x, unfused = resnet
    original = _scoring.PackedConv2d.forward
    seen = []

    def raises_from_the_third_pass(self, *args):  # as oneDNN might at a batch size it has not seen
        seen.append(args[0].shape[0])
        if len(seen) > 2 * 20:  # 20 convolutions per pass: the check on the inputs and one batch pass
            raise RuntimeError("mkldnn: unsupported batch size")
        return original(self, *args)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        mp.setattr(_scoring.PackedConv2d, "forward", raises_from_the_third_pass)
        e = _score_cam(model, x)
    assert "the fused pass raised RuntimeError('mkldnn: unsupported batch size'); unfused from now on" in caplog.text
    assert caplog.text.count("unfused from now on") == 1 and len(seen) == 2 * 20 + 1  # never tried again
    _same_maps(e, unfused)


def test_a_fused_copy_whose_scores_change_is_dropped_for_the_unfused_one(resnet, caplog):
    model, x, unfused = resnet
    original = _scoring.PackedConv2d.forward

    def wrong(self, *args):
        return original(self, *args) * 1.01

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        mp.setattr(_scoring.PackedConv2d, "forward", wrong)
        e = _score_cam(model, x)
    assert "fusing the convolutions changed the scores; not fused" in caplog.text
    _same_maps(e, unfused)


def test_an_untraceable_model_is_scored_on_the_unfused_copy():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        fused, plain = (gradcam_ref.explain(model, x, [0, 2], layer="conv", method="score-cam", fuse_convolutions=f)
                        for f in (True, False))
    np.testing.assert_array_equal(fused.weights.numpy(), plain.weights.numpy())


def test_fuse_convolutions_must_be_a_bool(resnet):
    model, x, _ = resnet
    with pytest.raises(TypeError, match="fuse_convolutions must be a bool, got int"):
        _score_cam(model, x, fuse_convolutions=1)


# --- random graphs: the fused copy computes what the model computes -------------------------------

OPS = ("conv3", "conv1", "depthwise", "relu_module", "relu_inplace", "relu_function", "relu_method", "add",
       "maxpool")


class Graph(nn.Module):
    """A random graph of same-shape tensors: each step applies ``op`` to node ``source`` (and adds
    node ``other`` for ``add``); the output sums the last node and the nodes in ``outputs`` (read
    late, after additions that may have been written in place)."""

    def __init__(self, channels: int, steps: list[tuple[str, int, int]], outputs: list[int]) -> None:
        super().__init__()
        self.steps, self.outputs = steps, outputs
        self.layers = nn.ModuleList()
        for op, _, _ in steps:
            layer: nn.Module
            if op == "conv3":
                layer = nn.Conv2d(channels, channels, 3, padding=1)
            elif op == "conv1":
                layer = nn.Conv2d(channels, channels, 1, bias=False)
            elif op == "depthwise":
                layer = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
            elif op in ("relu_module", "relu_inplace"):
                layer = nn.ReLU(inplace=op == "relu_inplace")
            elif op == "maxpool":
                layer = nn.MaxPool2d(3, stride=1, padding=1)
            else:
                layer = nn.Identity()
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for (op, source, other), layer in zip(self.steps, self.layers, strict=True):
            v = nodes[source]
            if op == "relu_function":
                y = nn.functional.relu(v)
            elif op == "relu_method":
                y = v.relu()
            elif op == "add":
                y = v + nodes[other]
            else:
                y = layer(v)
            nodes.append(y)
        out = nodes[-1]
        for i in self.outputs:
            out = out + nodes[i]
        return out


@st.composite
def graphs(draw):
    n = draw(st.integers(2, 9))
    steps = []
    for i in range(n):
        op = draw(st.sampled_from((*OPS, "conv3", "add", "add")))  # more residual additions
        source = draw(st.sampled_from([i, i, *range(i + 1)]))  # mostly the node just before
        other = draw(st.sampled_from([max(i - 2, 0), max(i - 2, 0), *range(i + 1)]))  # often a block's input
        steps.append((op, source, other))
    outputs = draw(st.lists(st.integers(0, n), max_size=2))
    return steps, outputs


@settings(max_examples=150, deadline=None)
@given(graphs(), st.integers(0, 2 ** 16))
@example(([("conv3", 0, 0), ("conv3", 0, 0), ("relu_inplace", 0, 0), ("add", 3, 1)], []), 0)  # found by it
@example(([("conv3", 0, 0), ("relu_method", 0, 0), ("add", 2, 1)], []), 0)
def test_the_fused_graph_computes_what_the_model_computes(case, seed):
    steps, outputs = case
    torch.manual_seed(seed)
    model = Graph(4, steps, outputs).eval()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x.clone())  # the model's own in-place ReLUs may write into x
    fused = _scoring.fuse(model)
    if fused is None:
        assert not any(op.startswith(("conv", "depthwise")) for op, _, _ in steps)
        return
    kept = x.clone()
    with torch.inference_mode():
        got = fused(x if not any(op == "relu_inplace" for op, _, _ in steps) else x.clone())
    assert torch.equal(x, kept)  # never written into by a fused addition
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 1e-5 * scale


class _WritesBetween(nn.Module):
    """``relu_`` of the convolution's input (through a view) between the convolution and its addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool(x)
        y = self.conv(a)
        a[:, :2].relu_()
        return y + self.pool(x)


def test_a_convolution_is_not_moved_past_a_write_into_its_input():
    """Fusing moves a convolution to its addition; an in-place op between them (here on a view
    of the convolution's input) would then change what it reads: it is packed alone there."""
    torch.manual_seed(0)
    model = _WritesBetween().eval()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        fused = _scoring.fuse(model)
        got = fused(x)
    assert _kinds(fused) == (1, 0, 0, 0)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
