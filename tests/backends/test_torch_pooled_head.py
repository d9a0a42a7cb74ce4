"""The torch backend's hand-taken chain rule through a linear layer of a global average
(``_pooled_head``): the gradients equal those of dense one-hot seeds through torch's own backward
formulas to the bit, for every shape of such a head; every other head, and one whose weights
depend on the layer, is left to the engine; a batch of targets that vmap cannot batch goes one
target at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from gradcam_ref.backends.torch import _backward
from tests.backends.test_torch_sparse_seeds import dense_reference, values
from tests.backends.torch_nets import assert_same_state, model_state, one_thread  # noqa: F401  (autouse)

ACTIVATIONS = {"identity": lambda x: x, "relu": torch.relu, "relu6": nn.functional.relu6,
               "silu": nn.functional.silu, "tanh": torch.tanh}


class PooledHead(nn.Module):
    """``activation`` -> a global average over the spatial dims (written ``pool``) -> a linear layer."""

    def __init__(self, pool: str, activation: str, k: int, c: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.pool, self.activation = pool, ACTIVATIONS[activation]
        self.linear = nn.Linear(k, c, bias=bias, dtype=dtype)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x = self.x = self.activation(a)  # (kept for the test: the gradient w.r.t. it)
        spatial = tuple(range(2, x.ndim))
        if self.pool == "AdaptiveAvgPool + Flatten":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        elif self.pool == "mean(keepdim) + view":
            x = x.mean(dim=spatial, keepdim=True).view(x.shape[0], -1)
        elif self.pool == "flatten + mean":  # (X, the average's input, is then the flattened view)
            x = self.x = x.flatten(2)
            x = x.mean(dim=-1)
        elif self.pool == "mean(negative dims)":
            x = x.mean(dim=tuple(d - x.ndim for d in spatial))
        elif self.pool == "mean(keepdim) + squeeze":
            x = x.mean(dim=spatial, keepdim=True).squeeze(-1).squeeze(-1) if x.ndim == 4 else x.mean(spatial)
        else:
            x = x.mean(dim=spatial)
        return self.linear(x)


EXACT = {"identity", "relu", "relu6"}
"""Activations whose backward is a selection (the same value in any memory layout)."""

POOLS = ("mean", "AdaptiveAvgPool + Flatten", "mean(keepdim) + view", "mean(negative dims)",
         "mean(keepdim) + squeeze", "flatten + mean")


def took_the_pooled_head(model: nn.Module, a: torch.Tensor) -> bool:
    leaf = a.clone().requires_grad_(True)
    return _backward._linear_of_mean(model(leaf.clone()), leaf) is not None


@settings(max_examples=60, deadline=None)
@given(pool=st.sampled_from(POOLS), activation=st.sampled_from(sorted(ACTIVATIONS)), bias=st.booleans(),
       n=st.integers(1, 3), k=st.integers(1, 5), c=st.integers(1, 6), t=st.integers(0, 3),
       spatial=st.sampled_from([(1,), (3,), (2, 3), (1, 1), (7, 7), (2, 1, 3)]),
       seed=st.integers(0, 2**32 - 1), fill=st.lists(values, min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
@example(pool="flatten + mean", activation="tanh", bias=True, n=1, k=2, c=3, t=0, spatial=(2, 2), seed=0, fill=[1.0],
         dtype=torch.float64)  # seeds written in X's shape (N, K, Z), not A's (N, K, 2, 2)
def test_the_pooled_head_gives_the_dense_seeds_gradients_to_the_bit(pool, activation, bias, n, k, c, t, spatial,
                                                                    seed, fill, dtype):
    if pool == "AdaptiveAvgPool + Flatten" and len(spatial) != 2:
        spatial = (2, 3)
    torch.manual_seed(seed)
    model = PooledHead(pool, activation, k, c, bias, dtype)
    with torch.no_grad():  # exact zeros (both signs), ties, huge and tiny weights, finite in dtype
        w = model.linear.weight.view(-1)
        big = torch.finfo(dtype).max
        w[:len(fill)] = torch.tensor(fill, dtype=torch.float64).clamp(-big, big).to(dtype)[: w.numel()]
    a = torch.randn(n, k, *spatial, dtype=dtype) * 3
    targets = np.random.default_rng(seed).integers(0, c, size=(n,) if t == 0 else (n, t))
    assert took_the_pooled_head(model, a)
    leaf = a.clone().requires_grad_(True)
    scores = model(leaf.clone())
    # At X (the average's input) the seeds are torch's backward formulas' values to the bit ...
    columns = targets[:, None] if targets.ndim == 1 else targets
    at_x = torch.stack([torch.autograd.grad(scores, [model.x], torch.zeros_like(scores).scatter_(
        1, torch.as_tensor(columns[:, i:i + 1]), 1.0), retain_graph=True)[0] for i in range(columns.shape[1])])
    edge, seeds, _ = _backward._pooled_seeds(scores, leaf, targets)
    assert torch.equal(seeds, at_x)  # (a view: one value per channel, expanded over the positions)
    # ... and so is the gradient at A where the ops below X round alike in any layout.
    expected = dense_reference(scores, leaf, targets)
    got = _backward.gradients(scores, leaf, targets, "A")
    assert got.layout == torch.strided and got.dtype == expected.dtype and got.shape == expected.shape
    if activation in EXACT:
        assert torch.equal(got, expected)  # to the bit (a zero's sign may differ: -0.0 == 0.0)
    else:  # SiLU's vectorised loop (contiguous seeds) and scalar loop (torch's broadcast) differ in the last bit
        torch.testing.assert_close(got, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)


class NotPooled(nn.Module):
    """Heads that look like a linear layer of an average but are not one (``_pooled_head`` declines)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(4, 5, dtype=torch.float64)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean over channels":
            return self.linear(a.mean(dim=1).flatten(1)[:, :4])
        if self.kind == "max pool":
            return self.linear(a.amax(dim=(2, 3)))
        if self.kind == "mean of part of the grid":
            return self.linear(a.mean(dim=2)[..., 0])
        if self.kind == "as_strided, transposed":  # the average's (n, k) read as (k, n)
            pooled = a.mean(dim=(2, 3), keepdim=True)
            return self.linear(torch.as_strided(pooled, pooled.shape, (1, a.shape[0], 1, 1)).flatten(1))
        pooled = a.mean(dim=(2, 3))
        if self.kind == "dropout in training":
            return self.linear(nn.functional.dropout(pooled, 0.5, training=True))
        if self.kind == "permuted":
            return self.linear(pooled.T.contiguous().T)
        if self.kind == "weights from the layer":
            return pooled @ (self.linear.weight + pooled.sum()).T
        if self.kind == "weights are the layer":
            return pooled @ pooled.T
        if self.kind == "addmm, alpha 2":
            return torch.addmm(self.linear.bias, pooled, self.linear.weight.T, alpha=2.0)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["mean over channels", "max pool", "mean of part of the grid", "dropout in training",
                                  "permuted", "as_strided, transposed", "weights from the layer", "weights are the layer", "addmm, alpha 2"])
def test_other_heads_are_left_to_the_engine_and_agree_with_the_dense_seeds(kind):
    torch.manual_seed(0)
    model = NotPooled(kind)
    a = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    assert not took_the_pooled_head(model, a)
    for targets in (np.array([1, 0, 3, 2]), np.array([[1, 3], [0, 0], [2, 3], [3, 1]])):
        torch.manual_seed(1)  # the dropout mask
        leaf = a.clone().requires_grad_(True)
        scores = model(leaf.clone())
        expected = dense_reference(scores, leaf, targets)
        torch.manual_seed(1)
        leaf = a.clone().requires_grad_(True)
        got = _backward.gradients(model(leaf.clone()), leaf, targets, "A")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _NoVmap(torch.autograd.Function):
    """``x ** 2`` whose backward leaves torch (``.numpy()``): a batched backward pass through it raises."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(grad.numpy() * 2) * x


def test_targets_that_vmap_cannot_batch_go_one_pass_each():
    torch.manual_seed(0)
    linear = nn.Linear(3, 6, dtype=torch.float64)
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    targets = np.array([[5, 0, 2], [1, 1, 4]])
    leaf = a.clone().requires_grad_(True)
    scores = linear(_NoVmap.apply(leaf.clone()).mean(dim=(2, 3)))
    assert _backward._linear_of_mean(scores, leaf) is not None
    with pytest.raises(RuntimeError):  # what the pooled head's batched pass meets first
        torch.autograd.grad(scores, [leaf], torch.ones((3, *scores.shape), dtype=scores.dtype),
                            retain_graph=True, is_grads_batched=True)
    expected = dense_reference(scores, leaf, targets)
    assert torch.equal(_backward.gradients(scores, leaf, targets, "A"), expected)


def test_a_score_that_does_not_depend_on_the_layer_is_refused_as_on_the_dense_path():
    linear = nn.Linear(3, 4, dtype=torch.float64)
    leaf = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    other = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    scores = linear(torch.relu(other).mean(dim=(2, 3)))
    assert _backward._linear_of_mean(scores, leaf) is not None
    for targets in (np.array([2]), np.array([[2, 3]])):
        with pytest.raises(ValueError, match="^the score does not depend on A: no autograd path from it to the score "):
            _backward.gradients(linear(torch.relu(other).mean(dim=(2, 3))), leaf, targets, "A")


def test_explain_on_efficientnet_style_head_leaves_the_model_as_it_was_and_agrees_with_the_dense_path(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 10)).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    before = model_state(model)
    calls = []
    original = _backward._pooled_head
    monkeypatch.setattr(_backward, "_pooled_head", lambda *args: calls.append(1) or original(*args))
    for layer in ("1", "0"):  # below the head: a ReLU6, or a batch norm and a ReLU6
        for targets in ([3, 7], [[3, 9, 0], [7, 7, 1]]):
            pooled = gradcam_ref.explain(model, x, targets, layer=layer)
            assert_same_state(before, model_state(model))
            with monkeypatch.context() as dense:
                dense.setattr(_backward, "_SPARSE_SEEDED", frozenset())
                reference = gradcam_ref.explain(model, x, targets, layer=layer)
            for name in ("gradients", "weights", "maps"):
                assert torch.equal(getattr(pooled, name), getattr(reference, name)), name
    assert len(calls) == 8


@pytest.mark.parametrize("activation", [nn.ReLU6(), nn.Identity()])
@pytest.mark.parametrize("targets", [[3, 7], [[3, 9, 0], [7, 7, 1]]])
def test_a_channels_last_model_gets_channels_last_gradients_equal_to_the_dense_ones(targets, activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).double().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    leaf = model[0](x).detach().requires_grad_(True)
    assert not leaf.is_contiguous() and leaf.is_contiguous(memory_format=torch.channels_last)
    scores = model[1:](leaf.clone())
    t = np.asarray(targets)
    expected = dense_reference(scores, leaf, t)
    got = _backward.gradients(scores, leaf, t, "A")
    assert torch.equal(got, expected)
    # written out (the expanded seeds, handed through by an identity, are copied), in A's layout
    assert all((got[:, i] if t.ndim == 2 else got).is_contiguous(memory_format=torch.channels_last)
               for i in range(t.shape[-1] if t.ndim == 2 else 1))
    e = gradcam_ref.explain(model, x, targets, layer="0")
    assert torch.equal(e.gradients, expected)


class _WritesIntoItsGradient(torch.autograd.Function):
    """A ReLU whose backward zeroes its incoming gradient in place (as some guided-backprop code does)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad[x < 0] = 0
        return grad


class _CustomReLU(nn.Module):
    def forward(self, x):
        return _WritesIntoItsGradient.apply(x)


@pytest.mark.parametrize("targets", [[1, 2], [[1, 2, 3], [0, 4, 1]]])
def test_a_custom_function_that_writes_into_its_gradient_gets_written_seeds(targets):
    # Expanded seeds hold one value per channel: a write into one position would be a write into all.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), _CustomReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).double().eval()
    a = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    t = np.asarray(targets)
    leaf = a.clone().requires_grad_(True)
    scores = model[1:](leaf.clone())
    edge, seeds, selections = _backward._pooled_seeds(scores, leaf, t)
    assert not selections and 0 not in seeds.stride()
    expected = dense_reference(scores, leaf, t)
    got = gradcam_ref.explain(model, a, targets, layer="0").gradients
    assert torch.equal(got, expected) and bool((got == 0).any()) and bool((got != 0).any())


@pytest.mark.parametrize("activation, selected", [(nn.ReLU6(), True), (nn.ReLU(), True), (nn.Identity(), True),
                                                  (nn.Threshold(0.5, 0.0), True), (nn.SiLU(), False),
                                                  (nn.LeakyReLU(), False)])
def test_targets_through_selections_are_one_mask_times_the_seeds(activation, selected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 7)).double().eval()
    a = torch.randn(3, 6, 4, 5, dtype=torch.float64) * 3
    t = np.array([[1, 6], [0, 0], [5, 2]])
    leaf = a.clone().requires_grad_(True)
    scores = model[1:](leaf.clone())
    edge, seeds, selections = _backward._pooled_seeds(scores, leaf, t)
    assert selections == selected and (0 in seeds.stride()) == selected  # expanded through selections only
    if selected:
        assert _backward._selected(edge, leaf, seeds) is not None
    expected = dense_reference(scores, leaf, t)
    got = gradcam_ref.explain(model, a, t, layer="0").gradients
    if selected or isinstance(activation, nn.LeakyReLU):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=4 * torch.finfo(torch.float64).eps, atol=0)


def test_an_infinite_weight_takes_the_passes_and_gives_no_nan_where_the_mask_is_zero():
    # 0 * inf would be NaN: channel 0 is cut by the ReLU everywhere, its weight for class 1 infinite.
    model = nn.Sequential(nn.Identity(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double()
    with torch.no_grad():
        model[4].weight[1, 0] = math.inf
    a = torch.rand(1, 3, 2, 2, dtype=torch.float64) + 0.5
    a[:, 0] = -1.0
    t = np.array([[1, 2]])
    leaf = a.clone().requires_grad_(True)
    scores = model.eval()[1:](leaf.clone())
    edge, seeds, selections = _backward._pooled_seeds(scores, leaf, t)
    assert selections and _backward._selected(edge, leaf, seeds) is None
    got = _backward.gradients(scores, leaf, t, "A")
    assert torch.equal(got, dense_reference(scores, leaf, t)) and not bool(got.isnan().any())
    assert bool((got[0, 0, 0] == 0).all())


@pytest.mark.parametrize("name, layer, pooled", [("resnet18", "layer4", True), ("resnet18", "layer4.1.bn2", True),
                                                 ("mobilenet_v3_small", "features.12", False),
                                                 ("efficientnet_b0", "features.8", True)])
@pytest.mark.parametrize("targets", [[3, 7], [[1, 5, 19], [0, 0, 7]]])
def test_torchvision_heads_give_the_dense_seeds_gradients_to_the_bit(name, layer, pooled, targets):
    # Real heads (ReLU, an in-place ReLU after the layer, SiLU + dropout; MobileNetV3's, which is
    # not a linear layer of the average), float32 and channels last: the gradients are those of
    # dense one-hot seeds; through a pooled head they come in A's layout (torch's own mean
    # backward hands them on contiguous), else in torch's. MobileNetV3's (N, T) targets take
    # torch's vmap-batched pass: its (T N, C) @ (C, K) products may sum in another order than T
    # single passes' (BLAS blocks by the number of rows, per CPU: equal on one machine, 8 ulp of
    # the largest value apart on an AMD EPYC), so there the bits are torch's batched pass's.
    import torchvision  # a dependency of the torch extra
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=20).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    kept = {}

    def hook(module, args, output):
        kept["a"] = output
        return output.clone()  # so that an in-place op after the layer leaves A alone

    handle = model.get_submodule(layer).register_forward_hook(hook)
    scores = model(x)
    handle.remove()
    t = np.asarray(targets)
    expected = dense_reference(scores, kept["a"], t)
    got = gradcam_ref.explain(model, x, targets, layer=layer).gradients
    if pooled or t.ndim == 1:
        assert torch.equal(got, expected)
    else:
        seeds = torch.zeros((t.shape[1], *scores.shape)).scatter_(2, torch.as_tensor(t.T[:, :, None]), 1.0)
        batched = torch.autograd.grad(scores, [kept["a"]], seeds, retain_graph=True, is_grads_batched=True)[0]
        assert torch.equal(got, batched.movedim(0, 1))
        bound = 64 * torch.finfo(got.dtype).eps * float(expected.abs().max())  # a 1024-term dot product, reordered
        torch.testing.assert_close(got, expected, rtol=0, atol=bound)
    assert _backward._linear_of_mean(scores, kept["a"]) is None or pooled  # (kept["a"] is no leaf: a probe)
    layout = kept["a"].stride() if pooled else dense_reference(scores, kept["a"], t.reshape(2, -1)[:, 0]).stride()
    assert all((got if t.ndim == 1 else got[:, i]).stride() == layout for i in range(t.size // 2))
