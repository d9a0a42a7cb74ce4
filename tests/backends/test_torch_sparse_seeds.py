"""The torch backend's sparse one-hot seeds (``_sparse_seeded``; a linear layer of a global average
goes by ``_pooled_head``, tests/backends/test_torch_pooled_head.py): the gradients of scores straight
out of ``mm``/``addmm`` equal the dense seeds' ones; every other last op keeps the dense seed; a
sparse pass that fails (or hands back a sparse gradient) falls back to the dense one on an intact
graph; an Inf or NaN in another class's row of the linear layer no longer turns the gradient into
NaN (the dense product's ``0 * inf``), while one in the target's row stays where it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
import gradcam_ref.backends.torch as torch_backend
from gradcam_ref.backends.torch import _backward
from tests.backends.torch_nets import assert_same_state, model_state, one_thread  # noqa: F401  (autouse)

values = st.one_of(st.just(0.0), st.just(-0.0), st.just(1e-300), st.just(-1e300), st.just(1e30),
                   st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


def dense_reference(scores: torch.Tensor, leaf: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    """One dense one-hot seed per target, public ``torch.autograd.grad``: ``(N, ...)`` or ``(N, T, ...)``."""
    columns = targets[:, None] if targets.ndim == 1 else targets
    rows = []
    for t in range(columns.shape[1]):
        seed = torch.zeros_like(scores).scatter_(1, torch.as_tensor(columns[:, t:t + 1]), 1.0)
        rows.append(torch.autograd.grad(scores, [leaf], grad_outputs=seed, retain_graph=True)[0])
    return rows[0] if targets.ndim == 1 else torch.stack(rows, dim=1)


class Last(nn.Module):
    """Features -> global average pool -> ``kind``: the op that makes the scores."""

    def __init__(self, kind: str, k: int, c: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(k, c, bias=kind != "linear, no bias", dtype=dtype)
        self.conv = nn.Conv2d(k, c, 1, dtype=dtype)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(a)
        if self.kind == "conv 1x1, flatten":
            return self.conv(a).mean(dim=(2, 3))
        pooled = a.mean(dim=(2, 3))
        if self.kind == "log_softmax of linear":
            return torch.log_softmax(self.linear(pooled), dim=1)
        if self.kind == "addmm, alpha and beta":
            return torch.addmm(self.linear.bias, pooled, self.linear.weight.T, beta=2.0, alpha=0.5)
        return self.linear(pooled)


KINDS = ("linear", "linear, no bias", "addmm, alpha and beta", "conv 1x1, flatten", "log_softmax of linear")
SPARSE = {"linear", "linear, no bias", "addmm, alpha and beta"}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 3), k=st.integers(1, 4), c=st.integers(1, 6),
       t=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), fill=st.lists(values, min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sparse_seeds_give_the_dense_seeds_gradients(kind, n, k, c, t, seed, fill, dtype):
    torch.manual_seed(seed)
    model = Last(kind, k, c, dtype)
    with torch.no_grad():  # exact zeros (both signs), ties, huge and tiny weights, finite in dtype
        w = model.linear.weight.view(-1)
        big = torch.finfo(dtype).max
        w[:len(fill)] = torch.tensor(fill, dtype=torch.float64).clamp(-big, big).to(dtype)[: w.numel()]
    a = torch.randn(n, k, 2, 3, dtype=dtype)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, c, size=(n,) if t == 0 else (n, t))
    leaf = a.requires_grad_(True)
    scores = model(leaf.clone())
    expected = dense_reference(scores, leaf, targets)
    assert (scores.grad_fn.name() in _backward._SPARSE_SEEDED) == (kind in SPARSE)
    got = _backward.gradients(scores, leaf, targets, "A")  # inference: frees the graph
    assert got.layout == torch.strided and got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)  # values to the bit (a zero's sign may differ: -0.0 == 0.0)


def test_the_sparse_path_is_taken_for_a_linear_head_and_not_for_others():
    """A linear layer of a global average goes by hand (``_pooled_head``); ``addmm`` with
    ``alpha != 1`` by sparse seeds; the rest densely."""
    calls = []

    def spy(name):
        original = getattr(_backward, name)

        def call(*args):
            found = original(*args)
            if found is not None:
                calls.append(name)
            return found
        return call

    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("_pooled_head", "_sparse_seeded"):
            patch.setattr(_backward, name, spy(name))
        for kind in KINDS:
            calls.append(kind)
            model = Last(kind, 3, 5, torch.float64).eval()
            e = gradcam_ref.explain(nn.Sequential(nn.Identity(), model), a, [1, 4], layer="0")
            assert e.maps.shape == (2, 4, 4)
    assert calls == ["linear", "_pooled_head", "linear, no bias", "_pooled_head",
                     "addmm, alpha and beta", "_sparse_seeded", "conv 1x1, flatten", "log_softmax of linear"]


class _RefusesSparse(torch.autograd.Function):
    """``x @ w.T`` whose backward raises on a sparse gradient (as ``reshape`` or ``softmax`` do)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad):
        if grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported here")
        (w,) = ctx.saved_tensors
        return grad @ w, None


class _PassesSparseOn(torch.autograd.Function):
    """The identity, whose backward hands a sparse gradient on unchanged: the leaf's would be sparse."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.parametrize("function", ["_RefusesSparse", "_PassesSparseOn"])
@pytest.mark.parametrize("t", [0, 3])
def test_a_failed_sparse_pass_falls_back_to_the_dense_seeds_on_an_intact_graph(monkeypatch, function, t):
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64)
    if function == "_RefusesSparse":
        leaf = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
        scores = _RefusesSparse.apply(leaf.clone(), w)
    else:  # the scores are the leaf itself, through the identity: nothing densifies the seed
        leaf = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
        scores = _PassesSparseOn.apply(leaf)
    name = scores.grad_fn.name()
    targets = np.array([3, 5]) if t == 0 else np.array([[3, 0, 5], [1, 1, 2]])
    expected = dense_reference(scores, leaf, targets)
    monkeypatch.setattr(_backward, "_SPARSE_SEEDED", _backward._SPARSE_SEEDED | {name})
    assert _backward._sparse_seeded(scores, leaf, targets[None] if t == 0 else targets.T) is None
    got = _backward.gradients(scores, leaf, targets, "A")  # the graph was retained: no error
    assert got.layout == torch.strided and torch.equal(got, expected)


def test_without_the_engine_entry_point_the_dense_seeds_are_used(monkeypatch):
    monkeypatch.delattr(torch.autograd.graph, "_engine_run_backward")
    leaf = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    scores = nn.Linear(4, 3, dtype=torch.float64)(leaf.clone())
    assert _backward._sparse_seeded(scores, leaf, np.array([[0, 2]])) is None
    targets = np.array([0, 2])
    expected = dense_reference(scores, leaf, targets)
    assert torch.equal(_backward.gradients(scores, leaf, targets, "A"), expected)


def head(c: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Identity(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, c, dtype=dtype)).eval()


def test_an_inf_in_another_class_row_leaves_the_target_gradient_as_it_is():
    """dy_c/dA does not depend on another class's weights: with an Inf in class 1's row the
    gradient for class 3 is the one of the same model with that row finite (the dense product
    would give 0 * inf = NaN), and explain returns finite maps; class 1's own map is refused."""
    a = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    model = head(5)
    clean = gradcam_ref.explain(model, a, 3, layer="0")
    before = model_state(model)
    with torch.no_grad():
        model[4].weight[1, 2] = torch.inf
        model[4].weight[0, 0] = torch.nan
    e = gradcam_ref.explain(model, a, 3, layer="0")
    assert torch.equal(e.gradients, clean.gradients) and torch.equal(e.maps, clean.maps)
    assert bool(torch.isfinite(e.maps).all())
    assert not bool(torch.isfinite(e.scores[:, 1]).any())  # the scores themselves keep the Inf
    with pytest.raises(ValueError, match="gradients contains NaN or Inf"):
        gradcam_ref.explain(model, a, 1, layer="0")
    assert model_state(model).keys() == before.keys()


def test_non_finite_weights_in_the_target_row_reach_the_gradients_as_with_dense_seeds():
    a = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    model = head(3)
    with torch.no_grad():
        model[4].weight[2, 1] = torch.inf
        model[4].weight[2, 3] = torch.nan
    leaf = a.clone().requires_grad_(True)
    scores = model[1:](leaf.clone())
    targets = np.array([2])
    expected = dense_reference(scores, leaf, targets)
    got = _backward.gradients(scores, leaf, targets, "A")
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
    relu_open = a[0, 1] > 0  # the ReLU's backward passes inf where A > 0, an exact 0 elsewhere
    assert torch.equal(got[0, 1], torch.where(relu_open, torch.inf, 0.0).to(got.dtype))
    assert torch.equal(torch.isnan(got[0, 3]), a[0, 3] > 0) and not bool(got[0, 3][a[0, 3] <= 0].any())
    assert bool(torch.isfinite(got[0, [0, 2]]).all())


def test_the_model_is_left_as_it_was_and_explain_agrees_with_the_dense_path(monkeypatch):
    a = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    model = head(7)
    before = model_state(model)
    sparse = gradcam_ref.explain(model, a, [[1, 6], [0, 0], [5, 2]], layer="0", guided=True)
    assert_same_state(before, model_state(model))
    monkeypatch.setattr(_backward, "_SPARSE_SEEDED", frozenset())
    dense = gradcam_ref.explain(model, a, [[1, 6], [0, 0], [5, 2]], layer="0", guided=True)
    for name in ("gradients", "weights", "maps", "guided_backprop", "guided_grad_cam"):  # guided: to the inputs
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name


class _Held:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@pytest.mark.parametrize("targets", [3, [[3, 1], [0, 2]]])
def test_the_retained_graph_is_freed_before_the_guided_pass(monkeypatch, targets):
    """The sparse passes retain the graph (for the fallback); it goes as soon as the gradients
    are there: none of its saved tensors is alive when the guided pass starts."""
    import weakref

    held: list[weakref.ref] = []

    def pack(tensor):
        holder = _Held(tensor.detach())  # (an output held with its graph would make a cycle)
        held.append(weakref.ref(holder))
        return holder

    alive: list[int] = []
    guided = torch_backend._guided_backprop

    def counting(*args):
        alive.append(sum(ref() is not None for ref in held))
        return guided(*args)

    monkeypatch.setattr(torch_backend, "_guided_backprop", counting)
    model = head(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        e = gradcam_ref.explain(model, torch.randn(2, 4, 3, 3, dtype=torch.float64), targets, layer="0",
                                guided=True)
    assert e.guided_grad_cam is not None and held  # the Grad-CAM pass saved tensors (ReLU, addmm)
    assert alive == [0]


def test_t_targets_take_single_sparse_passes_only_when_no_product_lies_below_the_linear_layer():
    """``(N, T)`` targets: T sparse passes repeat the part under the linear layer T times, so they
    are taken for pooling and elementwise ops only; a convolution there keeps the batched pass
    (1 target: one sparse pass either way). The gradients agree with the dense seeds' either way."""
    calls = []
    original = _backward._sparse_seeded

    def spy(*args):
        calls.append(args[2].shape[0])
        return original(*args)

    torch.manual_seed(0)
    # (max pooling: a linear layer of an average goes by _pooled_head instead)
    light = nn.Sequential(nn.Identity(), nn.ReLU6(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(),
                          nn.Linear(3, 5)).double().eval()
    deep = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).double().eval()
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_backward, "_sparse_seeded", spy)
        for model, targets, taken in ((light, [[1, 4], [0, 2]], [2]), (deep, [[1, 4], [0, 2]], []),
                                      (deep, [1, 3], [1])):
            calls.clear()
            e = gradcam_ref.explain(model, a, targets, layer="0")
            assert calls == taken
            leaf = a.clone().requires_grad_(True)
            expected = dense_reference(model[1:](leaf), leaf, np.asarray(targets))
            torch.testing.assert_close(e.gradients, expected, rtol=0, atol=0)
