"""A layer's input read by other modules too, and token layers for the perturbation methods (torch).

``at="input"`` names a tensor: dy/dA sums every path from it to the score, whichever module reads
it and whenever (captum's ``attribute_to_layer_input`` does the same). A perturbation method
cannot replace that tensor at one reader, so it refuses such an input. Score-CAM and Ablation-CAM
take ``reshape`` as the gradient methods do.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcam_ref
from tests.backends.torch_nets import assert_same_state, model_state


class Skip(nn.Module):
    """stem -> A; A read by ``conv`` and, before or after it, by a skip path; a linear head."""

    def __init__(self, early: bool, tokens: bool, frozen: bool) -> None:
        super().__init__()
        self.early, self.tokens = early, tokens
        self.stem = nn.Embedding(7, 4) if tokens else nn.Conv1d(2, 4, 3)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x).transpose(1, 2).contiguous() if self.tokens else self.stem(x)
        skip = a.amax(dim=2) if self.early else None  # read before the layer runs
        b = self.conv(a).mean(dim=2)
        return self.fc(b + (skip if self.early else a.mean(dim=2) * 2.0))

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """The score from A itself: what dy/dA differentiates."""
        skip = a.amax(dim=2) if self.early else a.mean(dim=2) * 2.0
        return self.fc(self.conv(a).mean(dim=2) + skip)


@settings(max_examples=12, deadline=None)
@given(st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_the_input_of_a_layer_is_the_tensor_every_reader_sees(early, tokens, frozen, seed):
    torch.manual_seed(seed)
    net = Skip(early, tokens, frozen).double().eval()
    x = torch.randint(0, 7, (2, 6)) if tokens else torch.randn(2, 2, 8, dtype=torch.float64)
    before = model_state(net)
    e = gradcam_ref.explain(net, x, [0, 2], layer="conv", at="input")
    assert_same_state(before, model_state(net))  # requires_grad set back on frozen weights
    assert not any(t.requires_grad for t in (e.maps, e.activations, e.gradients, e.scores))
    a = e.activations.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net.head(a)[[0, 1], [0, 2]].sum(), a)
    torch.testing.assert_close(e.gradients, g, rtol=1e-12, atol=1e-15)
    # The same tensor as the output of the module that computes it (float inputs: the stem's).
    if not tokens:
        out = gradcam_ref.explain(net, x, [0, 2], layer="stem")
        torch.testing.assert_close(e.gradients, out.gradients, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(e.maps, out.maps, rtol=1e-12, atol=1e-15)


def test_perturbing_an_input_that_other_modules_read_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, dtype=torch.float64)
    net = Skip(early=False, tokens=False, frozen=False).double().eval()
    with pytest.raises(ValueError, match=r"the input of layer 'conv' is also read by other modules"):
        gradcam_ref.explain(net, x, [0, 1], layer="conv", at="input", method="ablation-cam")
    # Score-CAM perturbs the inputs, not the layer: the tensor's readers do not matter.
    at_input = gradcam_ref.explain(net, x, [0, 1], layer="conv", at="input", method="score-cam")
    at_stem = gradcam_ref.explain(net, x, [0, 1], layer="stem", method="score-cam")
    torch.testing.assert_close(at_input.maps, at_stem.maps, rtol=0, atol=0)
    # Read by the layer alone: Ablation-CAM at its input is Ablation-CAM at the stem's output.
    chain = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(24, 3))
    chain = chain.double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        at_input = gradcam_ref.explain(chain, x, [0, 1], layer="1", at="input", method="ablation-cam")
        at_output = gradcam_ref.explain(chain, x, [0, 1], layer="0", method="ablation-cam")
    torch.testing.assert_close(at_input.maps, at_output.maps, rtol=0, atol=0)


class Grid(nn.Module):
    """Patch embedding -> ``act`` (N, D, h, w) -> average and linear, plus a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 5, 4, stride=4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        self.cls = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.embed(x)).mean(dim=(2, 3))) + self.cls.sum()


class Tokens(nn.Module):
    """:class:`Grid` as a token model: a class token first, then the patches in raster order."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.grid.embed(x).flatten(2).transpose(1, 2)  # (N, h * w, D)
        cls = self.grid.cls.expand(x.shape[0], 1, -1)
        t = self.act(torch.cat([cls, patches], dim=1))  # (N, 1 + h * w, D)
        return self.grid.fc(t[:, 1:].mean(dim=1)) + t[:, 0].sum(dim=1, keepdim=True) * 0 + self.grid.cls.sum()


@pytest.mark.parametrize("method", ["score-cam", "ablation-cam"])
def test_token_layers_are_perturbed_on_their_grid(method):
    """Score-CAM and Ablation-CAM of a token layer with ``reshape`` are those of the same network
    built on the grid (before: perturb() refused ``reshape`` with a TypeError)."""
    torch.manual_seed(0)
    grid = Grid().double().eval()
    tokens = Tokens(grid).eval()
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        on_grid = gradcam_ref.explain(grid, x, [0, 2], layer="act", method=method)
        on_tokens = gradcam_ref.explain(tokens, x, [0, 2], layer="act", method=method, reshape=(4, 3))
        by_callable = gradcam_ref.explain(
            tokens, x, [0, 2], layer="act", method="score-cam",
            reshape=lambda t: t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 3))
    torch.testing.assert_close(on_tokens.activations, on_grid.activations, rtol=0, atol=0)
    torch.testing.assert_close(on_tokens.weights, on_grid.weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(on_tokens.maps, on_grid.maps, rtol=1e-12, atol=1e-14)
    if method == "score-cam":
        torch.testing.assert_close(by_callable.maps, on_grid.maps, rtol=1e-12, atol=1e-14)


def test_a_callable_reshape_cannot_be_undone_for_ablation():
    tokens = Tokens(Grid().double()).eval()
    with pytest.raises(ValueError, match=r"reshape must be the grid's sizes, e.g. \(14, 14\), not a callable"):
        gradcam_ref.explain(tokens, torch.randn(1, 3, 16, 12, dtype=torch.float64), 0, layer="act",
                            method="ablation-cam", reshape=lambda t: t)


class Halves(nn.Module):
    """ShuffleNet's split: ``x1, x2 = x.chunk(2, 1)``, ``branch`` reads ``x2`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        return self.fc(torch.cat([x1, self.branch(x2)], dim=1).mean(dim=(2, 3)))


class Shared(nn.Module):
    """``f`` called twice: first on a constant buffer (no history), then on the stem's output,
    in place by a ReLU on the model's own input first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.f = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.register_buffer("const", torch.ones(1, 4, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(x)  # in place, on the input
        c = self.f(self.const)
        return self.head((self.f(self.stem(x)) + c).mean(dim=(2, 3)))


def _ablation_by_hand(run, a: torch.Tensor) -> torch.Tensor:
    """Ablation-CAM's weights with denominator='abs': (y - y_k) / |y|, y_k with channel k of ``a`` at
    0; ``run`` maps ``a`` to the explained scores (N,)."""
    y = run(a)
    rows = []
    for k in range(a.shape[1]):
        ablated = a.clone()
        ablated[:, k] = 0
        rows.append((y - run(ablated)) / y.abs())
    return torch.stack(rows, dim=1)


def test_the_regressions_the_review_found():
    """A chunk's other half is another tensor (Ablation-CAM at its reader's input was refused);
    calls whose input has no history count too (an IndexError); call=-1 ablates the last call (it
    ablated nothing: zero weights); inputs made in inference mode and a model writing into its own
    input in place (errors at the input of a layer after the graph started at the inputs)."""
    torch.manual_seed(1)
    halves = Halves().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    e = gradcam_ref.explain(halves, x, [0, 1], layer="branch", at="input", method="ablation-cam",
                            denominator="abs")
    with torch.no_grad():
        x1, x2 = halves.stem(x).chunk(2, dim=1)
        hand = _ablation_by_hand(
            lambda a: halves.fc(torch.cat([x1, halves.branch(a)], dim=1).mean(dim=(2, 3)))[[0, 1], [0, 1]], x2)
    torch.testing.assert_close(e.weights, hand, rtol=1e-10, atol=1e-14)

    shared = Shared().double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    kept = x.clone()
    last = gradcam_ref.explain(shared, x, 0, layer="f", at="input", call=-1, method="ablation-cam",
                               denominator="abs")
    second = gradcam_ref.explain(shared, x, 0, layer="f", at="input", call=1, method="ablation-cam",
                                 denominator="abs")
    assert torch.equal(x, kept)  # the model's in-place ReLU wrote into copies: every pass saw the same x
    torch.testing.assert_close(last.weights, second.weights, rtol=0, atol=0)
    with torch.no_grad():
        a = shared.stem(torch.relu(x))
        hand = _ablation_by_hand(
            lambda v: shared.head((shared.f(v) + shared.f(shared.const)).mean(dim=(2, 3)))[:, 0], a)
    torch.testing.assert_close(second.weights, hand, rtol=1e-10, atol=1e-14)
    assert float(second.weights.abs().max()) > 0
    with torch.inference_mode():
        frozen = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    for method, options in (("grad-cam", {}), ("ablation-cam", {"denominator": "abs"})):
        made = gradcam_ref.explain(shared, frozen, 0, layer="f", at="input", call=1, method=method, **options)
        plain = gradcam_ref.explain(shared, frozen.clone(), 0, layer="f", at="input", call=1, method=method,
                                    **options)
        torch.testing.assert_close(made.maps, plain.maps, rtol=0, atol=0)


def test_a_softmax_over_another_axis_does_not_warn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                          nn.Softmax(dim=0)).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ProbabilityScoresWarning)
        gradcam_ref.explain(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), [0, 1], layer="1")
