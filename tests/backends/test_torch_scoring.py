"""Score-CAM's scoring copy (backends/torch/_scoring.py): batch norms folded into convolutions.

The copy must score like the model (hypothesis, random conv-bn-relu nets in float64: biases or
none, groups and depthwise, 1-D to 3-D, a norm not after a convolution, a convolution read twice),
fold exactly the pairs it may, leave the user's model as it was, and fall back to the unfolded
copy when folding would change the scores. Score-CAM on the folded copy against the same
computation by hand on the model itself (float64), and against the unfolded path (float32).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
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

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# --- fold_weights: a golden by hand -------------------------------------------------------------


def _pair(bias: bool, affine: bool = True) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(1, 2, 1, bias=bias).double()
    norm = nn.BatchNorm2d(2, eps=0.25, affine=affine).double().eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -3.0]).reshape(2, 1, 1, 1))
        if bias:
            conv.bias.copy_(torch.tensor([1.0, 0.5]))
        norm.running_mean.copy_(torch.tensor([1.0, -1.0]))
        norm.running_var.copy_(torch.tensor([3.75, 0.75]))  # + eps: 4 and 1
        if affine:
            norm.weight.copy_(torch.tensor([4.0, -1.0]))
            norm.bias.copy_(torch.tensor([0.5, 2.0]))
    return conv, norm


def test_fold_weights_golden_with_and_without_bias_and_affine():
    # s = gamma / sqrt(var + eps) = [4 / 2, -1 / 1] = [2, -1]; W' = W s; b' = (b - mean) s + beta
    w, b = _scoring.fold_weights(*_pair(bias=True))
    assert w.flatten().tolist() == [4.0, 3.0] and b.tolist() == [0.5, 0.5]
    w, b = _scoring.fold_weights(*_pair(bias=False))  # b = 0: b' = -mean s + beta
    assert w.flatten().tolist() == [4.0, 3.0] and b.tolist() == [-1.5, 1.0]
    w, b = _scoring.fold_weights(*_pair(bias=False, affine=False))  # gamma = 1, beta = 0: s = [1/2, 1]
    assert w.flatten().tolist() == [1.0, -3.0] and b.tolist() == [-0.5, 1.0]
    conv, norm = _pair(bias=True)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    folded = _scoring.fold(nn.Sequential(conv, norm), [("0", "1")])
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), _pair(bias=True)[1](_pair(bias=True)[0](x)), rtol=0, atol=1e-15)


# --- the copy scores like the model: random conv-bn-relu nets -----------------------------------

small = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 5e-324, -1e-300]),
                  st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=True))
"""Weights and inputs: exact zeros, ties, subnormals, ordinary values."""
variances = st.one_of(st.sampled_from([0.0, 5e-324, 1.0, 4.0]), st.floats(0.0, 4.0))
"""Running variances: exact zero (eps alone), subnormal, ordinary."""


class Net(nn.Module):
    """Blocks of conv [-> bn] [-> relu], a norm that follows no convolution, then mean and linear.

    ``spec`` per block: ``(out, kernel, groups, bias, norm, relu, read_twice)``; ``read_twice``
    adds the convolution's output to the norm's (the convolution's output is read twice: not
    foldable).
    """

    def __init__(self, rank: int, channels: int, spec: list[tuple], loose_norm: bool) -> None:
        super().__init__()
        self.spec = spec
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for out, kernel, groups, bias, _, _, _ in spec:
            self.convs.append(CONV[rank](channels, out, kernel, groups=groups, bias=bias, padding=kernel // 2))
            self.norms.append(NORM[rank](out))
            channels = out
        self.loose = NORM[rank](channels) if loose_norm else None
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (_, _, _, _, norm, relu, twice), conv, bn in zip(self.spec, self.convs, self.norms, strict=True):
            c = conv(x)
            x = bn(c) if norm else c
            if norm and twice:
                x = x + c
            if relu:
                x = torch.relu(x)
        if self.loose is not None:
            x = self.loose(x)
        return self.fc(x.flatten(2).mean(-1))

    def expected_pairs(self) -> int:
        """Each block's conv -> bn unless read twice; the loose norm when the last block ends at its conv."""
        *_, norm, relu, _ = self.spec[-1]
        return sum(1 for (*_, n, _, twice) in self.spec if n and not twice) + \
            (self.loose is not None and not norm and not relu)


@st.composite
def nets(draw):
    rank = draw(st.integers(1, 3))
    channels = draw(st.sampled_from([1, 2, 4]))
    spec = []
    c = channels
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from(["one", "depthwise", "two"]))
        out = draw(st.sampled_from([2, 4]))
        if groups == "depthwise":
            groups, out = c, c  # one filter per channel
        elif groups == "two" and c % 2 == 0:
            groups = 2
        else:
            groups = 1
        spec.append((out, draw(st.sampled_from([1, 3])), groups, draw(st.booleans()), draw(st.booleans()),
                     draw(st.booleans()), draw(st.booleans())))
        c = out
    net = Net(rank, channels, spec, draw(st.booleans())).double().eval()

    def fill(t: torch.Tensor, elements) -> None:
        t.copy_(torch.tensor(draw(st.lists(elements, min_size=t.numel(), max_size=t.numel())),
                             dtype=torch.float64).reshape(t.shape))

    with torch.no_grad():
        for p in net.parameters():
            fill(p, small)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                fill(m.running_mean, small)
                fill(m.running_var, variances)
                m.eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    side = 3 if rank == 3 else 5
    x = torch.tensor(draw(st.lists(small, min_size=2 * channels * side ** rank, max_size=2 * channels * side ** rank)),
                     dtype=torch.float64).reshape(2, channels, *([side] * rank))
    return net, x


@settings(max_examples=40, deadline=None)
@given(nets())
def test_the_folded_copy_scores_like_the_model(case):
    net, x = case
    before = model_state(net)
    assert len(_scoring.foldable_pairs(net)) == net.expected_pairs()
    layout = torch.channels_last if x.ndim == 4 else None
    made = _scoring.scoring_copy((net,), layout=layout, fold_batch_norms=True)
    if made is None:  # nothing to fold and no layout to change
        assert net.expected_pairs() == 0 and layout is None
        return
    (copy,), folded = made
    assert folded == net.expected_pairs()
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copy.modules()) == \
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) - folded
    with torch.no_grad():
        expected = net(x)
        got = copy(x if layout is None else x.contiguous(memory_format=layout))
    assert torch.isfinite(expected).all()
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 1e-12 * scale
    assert_same_state(before, model_state(net))


# --- what is not folded -------------------------------------------------------------------------


class Pairs(nn.Module):
    """conv1 -> bn1 and conv2 -> bn2, each foldable unless a test changes something."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)
        randomised_batch_norms(self, mean=(-1, 1), var=(0.5, 2), weight=(-2, 2), bias=(-1, 1))
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_hooks_training_norms_shared_and_read_modules_are_not_folded():
    net = Pairs()
    assert _scoring.foldable_pairs(net) == [("conv1", "bn1"), ("conv2", "bn2")]
    handle = net.bn1.register_forward_hook(lambda m, args, out: None)
    assert _scoring.foldable_pairs(net) == [("conv2", "bn2")]
    handle.remove()
    net.bn2.train()  # batch statistics: nothing to fold
    assert _scoring.foldable_pairs(net) == [("conv1", "bn1")]
    net.bn2.eval()
    net.bn2 = net.bn1  # one norm called twice: after conv1 and after conv2
    assert _scoring.foldable_pairs(net) == []

    class Reads(Pairs):  # the forward reads bn2's weight itself
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.bn2.weight.sum()

    assert _scoring.foldable_pairs(Reads()) == [("conv1", "bn1")]


class Untraceable(Pairs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return super().forward(x)


def test_a_model_that_does_not_trace_is_not_folded(caplog):
    with caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        assert _scoring.foldable_pairs(Untraceable()) == []
    assert "does not trace with torch.fx" in caplog.text
    assert _scoring.scoring_copy((Untraceable(),), layout=None, fold_batch_norms=True) is None


class Records(nn.Module):
    """Assigns to itself in forward: a Proxy, a counter, a new submodule; raises past a limit."""

    def __init__(self, limit: int = 10) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.last: torch.Tensor | None = None
        self.calls, self.limit = 0, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last = x
        self.extra = nn.ReLU()
        if self.calls > self.limit:
            raise RuntimeError("too many calls")
        return self.bn(self.conv(x))


@pytest.mark.parametrize("limit", [10, 0])
def test_tracing_leaves_the_model_as_it_was_also_when_it_raises(limit):
    """foldable_pairs traced the caller's model: its forward's assignments stayed (an fx Proxy in
    ``last``, ``calls`` counted, a new submodule), and torch.save(model) failed on the Proxy."""
    import io

    model = Records(limit).eval()
    before = dict(vars(model)), dict(model._modules)
    assert _scoring.foldable_pairs(model) == ([("conv", "bn")] if limit else [])
    assert model.last is None and model.calls == 0 and "extra" not in vars(model) | model._modules
    assert (dict(vars(model)), dict(model._modules)) == before
    torch.save(model, io.BytesIO())


class BiasIgnored(nn.Conv2d):
    """A convolution subclass whose forward ignores its bias: folding would change its scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, None, self.stride, self.padding)


def _score_cam(model, x, targets, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        return gradcam_ref.explain(model, x, targets, layer=options.pop("layer", "bn2"), method="score-cam",
                                   **options)


def test_a_copy_whose_scores_change_is_dropped_for_the_unfolded_one(caplog):
    net = Pairs()
    ignored = BiasIgnored(3, 3, 1, bias=False).double()
    with torch.no_grad():
        ignored.weight.copy_(net.conv2.weight)
    net.conv2 = ignored
    assert ("conv2", "bn2") in _scoring.foldable_pairs(net)  # the graph cannot tell
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.DEBUG, logger=_scoring.__name__):
        e = _score_cam(net, x, [0, 1])
    assert "changed the scores; not folded" in caplog.text
    plain = _score_cam(net, x, [0, 1], fold_batch_norms=False, memory_format="preserve")
    np.testing.assert_allclose(e.weights.numpy(), plain.weights.numpy(), rtol=1e-12, atol=0)


# --- Score-CAM on the folded copy ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "pytorch-grad-cam", "torchcam"])
def test_score_cam_on_the_folded_copy_is_the_computation_by_hand_in_float64(variant):
    net = Pairs()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = model_state(net)
    e = _score_cam(net, x, [0, 1], layer="conv2", variant=variant, batch_size=2)
    assert_same_state(before, model_state(net))
    masks = gradcam_ref.score_cam_masks(e.activations, (7, 7), variant=variant)
    with torch.no_grad():  # every channel's masked input scored by the model itself, unfolded
        for n, c in enumerate([0, 1]):
            s = torch.stack([net(x[n:n + 1] * masks[n, k])[0, c] for k in range(3)])
            np.testing.assert_allclose(e.weights[n].numpy(), torch.softmax(s, 0).numpy(), rtol=1e-10, atol=0)


def test_score_cam_folded_and_unfolded_agree_in_float32_under_pytorch_grad_cams_convention():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    randomised_batch_norms(net, mean=(-1, 1), var=(0.2, 3), weight=(0.5, 2), bias=(-0.5, 0.5))
    assert len(_scoring.foldable_pairs(net)) == 3
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    fast = _score_cam(net, x, [1, 4], layer="8", variant="pytorch-grad-cam")
    plain = _score_cam(net, x, [1, 4], layer="8", variant="pytorch-grad-cam", fold_batch_norms=False,
                       memory_format="preserve")
    a, b = fast.heatmap((16, 16), "pytorch-grad-cam"), plain.heatmap((16, 16), "pytorch-grad-cam")
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()


def test_fold_batch_norms_must_be_a_bool():
    with pytest.raises(TypeError, match="fold_batch_norms must be a bool, got str"):
        _score_cam(Pairs(), torch.randn(1, 2, 7, 7, dtype=torch.float64), [0], fold_batch_norms="yes")


@pytest.mark.parametrize("targets", [[0, 1], [[0, 1], [1, 0]]])
def test_score_cam_on_torch_warns_nothing(targets):
    """Every warning is an error here: the (N, M, T) target index once reached torch as a read-only
    NumPy broadcast view, and torch warned about writing into it (a user saw that warning; torch
    says it once per process, so the first parametrisation is the one that caught it)."""
    net = Pairs()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        e = gradcam_ref.explain(net, x, targets, layer="conv2", method="score-cam")
    assert np.isfinite(e.maps.numpy()).all()
