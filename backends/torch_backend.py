r"""PyTorch backend: Grad-CAM of any ``nn.Module`` at any layer, for any differentiable score.

``capture(model, inputs, target, *, layer, ...)`` returns the layer's activations :math:`A`, the
gradients :math:`\partial y^c / \partial A` and the model's scores; the core
(:class:`gradcam_ref.Explanation`) computes the weights and maps from them.

How a call runs (and what it costs):

1. The model runs under ``torch.no_grad()``: the part before the layer builds no autograd graph
   and keeps nothing for a backward pass, as in inference.
2. A forward hook on ``layer`` (a forward *pre*-hook with ``at="input"``, so that an in-place
   layer such as ``ReLU(inplace=True)`` has not yet overwritten its input, pytorch #95617) takes
   :math:`A`, detaches it into a leaf tensor that requires grad, switches grad mode on for the
   rest of the forward pass and hands the model an autograd *copy* of the leaf. The copy is what
   lets in-place ops after the layer run (an in-place op on a leaf, or on a view of one, is an
   error in PyTorch) and it keeps the captured :math:`A` at the values the layer produced; it
   costs one extra tensor the size of :math:`A`. No backward hook is used, so the in-place
   trouble of module backward hooks (pytorch #61519) cannot arise.
3. ``torch.autograd.grad(score, inputs=[A])`` runs the backward from the score down to the
   layer and no further: no layer before it is differentiated, no parameter gets a ``.grad``
   (``.backward()`` is never called). Grad mode, the hooks and everything else are restored in
   ``finally`` blocks, also when the model or the target raises.

So the working memory is that of an inference forward pass plus the autograd graph of the part
*after* the layer (usually a small head), and the time is about one forward pass.

Targets (parsed by :func:`gradcam_ref._targets.resolve_targets`, shared by every backend):

- ``None``, an int or N ints: one backward pass seeded with one-hot rows of the scores;
- an int array ``(N, T)``: T maps per example from *one* forward pass and *one* batched
  backward pass (``is_grads_batched=True``, i.e. ``vmap`` over the T one-hot seeds); gradients
  come out ``(N, T, K, *spatial)``. Should ``vmap`` refuse an op of the model (a ``RuntimeError``
  in the batched backward), the T backward passes are run one after the other over the same
  graph (``retain_graph``), which gives the same numbers more slowly;
- a callable ``scores -> (N,)``: the gradient of ``target(scores).sum()``, i.e. of each
  example's own score (a segmentation region's score, a regression output, a single-logit head
  or its negation for counterfactual maps). It must be built from torch operations on
  ``scores``.

Seeding every example at once gives each example its own gradient as long as the model treats
examples independently (eval mode; batch-norm in training mode mixes them).

Layer:

- ``layer``: a dotted name (``"layer4.1"``, ``"features.28"``, anything
  ``model.get_submodule`` accepts) or a module object of ``model``. An unknown name is an error
  that lists the closest names.
- ``at="output"`` (default) takes the module's output, ``at="input"`` its first positional
  input. The layer's output (input) must be one floating tensor ``(N, K, *spatial)``.
- A module called more than once in one forward pass (a shared activation module, a recurrent
  cell) is ambiguous: that is an error saying how many times it ran, unless ``call`` picks one:
  ``call=i`` is the i-th call (from 0), ``call=-1`` the last; a negative ``call`` first runs one
  extra inference forward pass (no graph) to count the calls. A layer that never runs is an error.
- The captured :math:`A` shares memory with the layer's own output tensor (the model goes on
  with the copy). Should the model later change that tensor in place through another reference,
  :math:`A` would no longer be what the layer produced: this is detected (PyTorch's version
  counter) and is an error.
- Split form ``model=(features, head)``: :math:`A` = ``features(inputs)`` and the scores are
  ``head(A)`` (the paper's :math:`y^c = f(A^1, \ldots, A^K)`); ``layer`` is then None.
- ``reshape``: for token activations ``(N, T, D)`` (vision transformers). A tuple of grid sizes
  ``(h, w)`` drops the first ``T - h*w`` tokens (class and register tokens) and lays the rest
  out row-major as ``(N, D, h, w)``; a callable is applied to the activations and (per example
  and target) to the gradients alike, so it must only rearrange values (e.g.
  ``lambda t: t.permute(0, 3, 1, 2)`` for channels-last ``(N, H, W, C)`` feature maps).

Guided backpropagation (``guided=True``; Springenberg et al., Guided Grad-CAM of Selvaraju et al.):

- What: :math:`\partial^{\text{guided}} y^c / \partial x`, the gradient of the score w.r.t. the
  *input*, where every ReLU passes the gradient g it receives as
  :math:`g \cdot [0 < z] \cdot [g > 0]` (z the ReLU's input). A ReLU capped at b (ReLU6,
  ``hardtanh(0, b)``, ``clamp(0, b)``) passes :math:`g \cdot [0 < z < b] \cdot [g > 0]`: its
  ordinary gradient (zero where it is flat, at and beyond either bound) restricted to positive g.
  Every other operation (SiLU, GELU, leaky ReLU, max-pooling, ...) keeps its ordinary gradient.
- How: the guided pass runs the model under :class:`GuidedReLUs`, a
  ``torch.overrides.TorchFunctionMode`` that sees every torch function call, module or not, and
  replaces each ReLU form it recognises by an autograd Function whose forward *is the original
  call* (the same numbers; in place when the call is in place) and whose backward is the rule
  above. Recognised (by the function called, so ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, b)``
  and ``nn.Threshold(0, 0)`` modules are caught through the functions they call):
  ``F.relu`` (``inplace`` or not), ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu``,
  ``Tensor.relu_``; ``F.relu6``; ``F.hardtanh``/``F.hardtanh_`` with ``min_val == 0``;
  ``torch.clamp``/``clip`` and their ``Tensor`` and in-place forms with ``min == 0`` (a Python
  number) and ``max`` None or a number, ``clamp_min``/``clamp_min_`` with 0; ``F.threshold``/
  ``torch.threshold``/``threshold_`` with ``threshold == value == 0``. Not recognised, so not
  guided: ReLUs written as other ops (``torch.maximum(x, zeros)``, ``x * (x > 0)``,
  ``torch.where``), ``clamp`` with a tensor bound, calls with ``out=``, and code the mode cannot
  see (TorchScript, C++ extensions). A guided pass that meets no ReLU at all warns
  (:class:`NoGuidedReLUWarning`): its result is the plain input gradient.
- Cost: a second pass, separate from the Grad-CAM one (whose backward stops at the layer): one
  forward pass with autograd from the input (the activation memory of a training step; the
  Grad-CAM pass keeps only the part after the layer) and one backward pass to the input (no
  parameter gradient is computed), batched over T targets like the Grad-CAM pass; about three
  forward passes of time, plus a small Python cost per torch call while the mode is active.
- Layout: ``guided_backprop`` has the shape of the inputs (with a T axis for ``(N, T)``
  targets); Guided Grad-CAM multiplies it with the maps upsampled to its trailing spatial axes,
  so it needs channels-first inputs ``(N, C, *S)`` with as many spatial axes as the maps.
- Global state: the mode is a context manager, so it is popped (and grad mode restored) even
  when the model or the target raises; after the call every ReLU has its ordinary gradient.
  The model's inputs are not modified (the model runs on a copy).

Warnings: a model (or part) in training mode (dropout and batch-norm make the maps random), and
examples whose gradients are exactly zero everywhere (their maps are zero: the score does not
depend on the layer there). A score with no autograd path to the layer is an error.
"""

from __future__ import annotations

import collections
import difflib
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradcam_ref._checks import check_feature_maps, shape_of
from gradcam_ref._explain import Capture
from gradcam_ref._guided import NoGuidedReLUWarning
from gradcam_ref._targets import resolve_targets

NAME = "torch"
AT = ("output", "input")

__all__ = ["AT", "NAME", "GuidedReLUs", "NoGuidedReLUWarning", "ZeroGradientWarning", "capture"]


class ZeroGradientWarning(UserWarning):
    """The score's gradient at the layer is exactly zero for some example: its map is zero."""




def capture(
    model: nn.Module | tuple[nn.Module, nn.Module],
    inputs: torch.Tensor,
    target: Any = None,
    *,
    layer: str | nn.Module | None = None,
    at: str = "output",
    call: int | None = None,
    reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor] | None = None,
    guided: bool = False,
) -> Capture:
    r"""Run ``model`` on ``inputs``; return :math:`A`, :math:`\partial y^c/\partial A` and y at ``layer``.

    Args:
      model: an ``nn.Module`` returning a tensor of scores (usually ``(N, C)`` logits), or a
        ``(features, head)`` pair of modules with scores ``head(features(inputs))``.
      inputs: one tensor ``(N, ...)``, on the model's device.
      target: None | int | N ints | int array ``(N, T)`` | callable ``scores -> (N,)``; see the
        module docstring.
      layer: dotted name or module of ``model`` (None in the split form).
      at: ``"output"`` or ``"input"`` of the layer.
      call: which call of the layer, when it runs more than once per forward pass.
      reshape: grid sizes or a callable turning token activations ``(N, T, D)`` into
        ``(N, D, *grid)``.
      guided: also run the guided pass (module docstring) for the same targets.

    Returns:
      ``Capture(activations (N, K, *spatial), gradients (N, K, *spatial) or
      (N, T, K, *spatial), scores, targets, guided_backprop)``, tensors detached, on the model's
      device; ``guided_backprop`` is ``(N, *inputs.shape[1:])``, ``(N, T, *inputs.shape[1:])``
      or None.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, ...), got {type(inputs).__name__}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {shape_of(inputs)}")
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, got {at!r}")
    if call is not None and (isinstance(call, bool) or not isinstance(call, (int, np.integer))):
        raise TypeError(f"call must be None or an int, got {call!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("explain needs autograd after the layer: call it outside torch.inference_mode()")

    if isinstance(model, (tuple, list)):
        features, head = _split_form(model, layer, at, call)
        _warn_if_training(features, head)
        leaf, scores = _forward_split(features, head, inputs)
        where = "the output of features"
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module or a (features, head) pair, got {type(model).__name__}"
            )
        module, name = _resolve_layer(model, layer)
        _warn_if_training(model)
        where = f"the {at} of layer {name!r}"
        index = call
        if call is not None and call < 0:
            runs = _count_calls(model, module, at, inputs)
            if runs == 0:
                raise ValueError(f"layer {name!r} never ran in the forward pass of {type(model).__name__}")
            if runs + call < 0:
                raise ValueError(f"call={call} but layer {name!r} ran {runs} time(s) in the forward pass")
            index = runs + call
        leaf, scores = _forward_hooked(model, module, name, at, index, inputs)

    _check_captured(leaf, scores, inputs, where)
    targets = resolve_targets(target, scores)
    gradients = _gradients(scores, leaf, targets, where)
    activations = leaf.detach()
    if reshape is not None:
        activations, gradients = _reshape(activations, gradients, reshape)
    check_feature_maps("activations", activations)
    _warn_zero_gradients(gradients, int(activations.ndim), where)
    guided_backprop = _guided_backprop(model, inputs, targets) if guided else None
    return Capture(
        activations, gradients, scores.detach(), None if callable(targets) else targets, guided_backprop
    )


# --- the forward pass ---------------------------------------------------------------------------


class _Probe:
    """Hook that takes A at the ``index``-th call of a module and starts the graph there.

    ``index`` None means "the only call": A is taken at the first call and the caller checks
    afterwards that there was no other.
    """

    def __init__(self, index: int | None, at: str, name: str) -> None:
        self.index = 0 if index is None else index
        self.at = at
        self.name = name
        self.calls = 0
        self.leaf: torch.Tensor | None = None
        self.version = 0

    def _take(self, value: Any) -> torch.Tensor | None:
        this = self.calls
        self.calls += 1
        if this != self.index:
            return None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(
                f"the {self.at} of layer {self.name!r} must be one floating-point tensor "
                f"(N, K, *spatial), got {kind}; pick a submodule that returns one"
            )
        leaf = value.detach().requires_grad_(True)
        self.leaf, self.version = leaf, leaf._version
        torch.set_grad_enabled(True)  # the rest of the forward pass builds the graph
        return leaf.clone()  # a non-leaf copy: in-place ops downstream leave `leaf` alone

    def output_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self._take(output)

    def input_hook(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if not args:
            raise TypeError(f"layer {self.name!r} was called without a positional input; use at='output'")
        copy = self._take(args[0])
        return None if copy is None else (copy, *args[1:])


def _forward_hooked(
    model: nn.Module, module: nn.Module, name: str, at: str, index: int | None, inputs: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    probe = _Probe(index, at, name)
    if at == "output":
        handle = module.register_forward_hook(probe.output_hook)
    else:
        handle = module.register_forward_pre_hook(probe.input_hook)
    grad_mode = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(False)
        scores = _run(model, inputs)
    finally:
        torch.set_grad_enabled(grad_mode)
        handle.remove()
    if probe.calls == 0:
        raise ValueError(
            f"layer {name!r} never ran in the forward pass of {type(model).__name__}: "
            "pick a module that the forward pass calls"
        )
    if index is None and probe.calls > 1:
        raise ValueError(
            f"layer {name!r} ran {probe.calls} times in one forward pass (a shared module), so its "
            f"{at} is ambiguous: pass call=i (0 <= i < {probe.calls}, or -1 for the last) to pick one"
        )
    if probe.leaf is None:
        raise ValueError(f"call={index} but layer {name!r} ran {probe.calls} time(s) in the forward pass")
    if probe.leaf._version != probe.version:
        raise RuntimeError(
            f"the model modified the {at} of layer {name!r} in place after the layer ran, so the "
            "captured activations are no longer the layer's; choose the module that does the "
            "in-place operation (or the next one) as the layer"
        )
    return probe.leaf, scores


def _count_calls(model: nn.Module, module: nn.Module, at: str, inputs: torch.Tensor) -> int:
    """How many times ``module`` runs in one forward pass (an inference pass, no graph)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    if at == "output":
        handle = module.register_forward_hook(count)
    else:
        handle = module.register_forward_pre_hook(count)
    try:
        with torch.no_grad():
            _run(model, inputs)
    finally:
        handle.remove()
    return calls[0]


def _forward_split(features: nn.Module, head: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    with torch.no_grad():
        a = _run(features, inputs)
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        kind = f"a {a.dtype} tensor" if isinstance(a, torch.Tensor) else type(a).__name__
        raise TypeError(f"features(inputs) must be one floating-point tensor (N, K, *spatial), got {kind}")
    leaf = a.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = _run(head, leaf.clone())
    return leaf, scores


def _run(model: nn.Module, inputs: torch.Tensor) -> Any:
    """``model(inputs)``; an error from the model gets a note with the input's shape."""
    try:
        return model(inputs)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(
                f"gradcam_ref: raised while running {type(model).__name__} on inputs of shape "
                f"{shape_of(inputs)} ({inputs.dtype}, {inputs.device})"
            )
        raise


def _check_captured(leaf: torch.Tensor, scores: Any, inputs: torch.Tensor, where: str) -> None:
    n = int(inputs.shape[0])
    a = shape_of(leaf)
    if len(a) < 2 or a[0] != n:
        raise ValueError(
            f"{where} has shape {a}, which is not a batch of N = {n} examples like inputs "
            f"{shape_of(inputs)}: Grad-CAM needs activations (N, K, *spatial); "
            "check the rank of inputs (a batch axis first)"
        )
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"the model must return one tensor of scores, got {type(scores).__name__}; "
            "wrap it in a module that returns the tensor to explain"
        )
    if scores.ndim < 1 or int(scores.shape[0]) != n:
        raise ValueError(
            f"the model's output has shape {shape_of(scores)}, not a batch of N = {n} examples "
            f"like inputs {shape_of(inputs)}"
        )


# --- the backward pass --------------------------------------------------------------------------


def _gradients(scores: torch.Tensor, leaf: torch.Tensor, targets: Any, where: str) -> torch.Tensor:
    r""":math:`\partial y^c / \partial A`: ``(N, K, *spatial)``, or ``(N, T, K, *spatial)``."""
    n = int(scores.shape[0])
    if callable(targets):
        y = targets(scores)
        if not isinstance(y, torch.Tensor) or shape_of(y) != (n,) or not y.is_floating_point():
            got = f"shape {shape_of(y)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"a callable target must return one floating score per example, a tensor of "
                f"shape (N,) = ({n},), got {got}"
            )
        return _grad(y, leaf, torch.ones_like(y), where)
    index = torch.as_tensor(targets, device=scores.device)
    if index.ndim == 1:  # seed[n, c] = 1 where c = targets[n]: sum_n y_n^{c_n}
        seed = torch.zeros_like(scores).scatter_(1, index[:, None], 1.0)
        return _grad(scores, leaf, seed, where)
    # (N, T): T one-hot seeds, seeds[t, n, targets[n, t]] = 1, one batched backward pass.
    t = int(index.shape[1])
    seeds = torch.zeros((t, *scores.shape), dtype=scores.dtype, device=scores.device)
    seeds.scatter_(2, index.T[:, :, None], 1.0)
    return _grad(scores, leaf, seeds, where, batched=True).movedim(0, 1)


def _grad(
    y: torch.Tensor, leaf: torch.Tensor, seed: torch.Tensor, where: str, batched: bool = False
) -> torch.Tensor:
    """The vector-Jacobian product ``seed . dy/dleaf`` (a batch of them when ``batched``)."""
    if y.grad_fn is None:
        raise ValueError(f"the score does not depend on {where}: no autograd path from it to the score")
    try:
        (g,) = torch.autograd.grad(
            y, [leaf], grad_outputs=seed, retain_graph=batched, allow_unused=True, is_grads_batched=batched
        )
    except RuntimeError:
        if not batched:
            raise
        # vmap cannot batch some op of the model: one backward pass per target, same graph.
        rows = []
        for i, s in enumerate(seed):
            (row,) = torch.autograd.grad(
                y, [leaf], grad_outputs=s, retain_graph=i + 1 < len(seed), allow_unused=True
            )
            rows.append(torch.zeros_like(leaf) if row is None else row)
        return torch.stack(rows)
    if g is None:
        raise ValueError(f"the score does not depend on {where}: no autograd path from it to the score")
    return g


def _warn_zero_gradients(gradients: torch.Tensor, rank: int, where: str) -> None:
    """Warn about examples (and targets) whose gradients are zero everywhere."""
    lead = int(gradients.ndim) - rank + 1  # 1 (N,) or 2 (N, T)
    # max |g| per example (and target) == 0: one vectorised reduction, no boolean array of the
    # gradients' size and no reshaped copy (the (N, T, ...) gradients are not contiguous).
    zero = gradients.abs().amax(dim=tuple(range(lead, int(gradients.ndim)))) == 0
    if bool(zero.any()):
        bad = torch.nonzero(zero).tolist()
        bad = [b[0] if lead == 1 else tuple(b) for b in bad]
        warnings.warn(
            f"the gradients of the score at {where} are exactly zero for "
            f"{'example' if lead == 1 else '(example, target)'} {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}: the score does not depend on the layer there, "
            "so the map is zero",
            ZeroGradientWarning,
            stacklevel=4,
        )


# --- guided backpropagation --------------------------------------------------------------------


def _guided_backprop(
    model: nn.Module | tuple[nn.Module, nn.Module], inputs: torch.Tensor, targets: Any
) -> torch.Tensor:
    r""":math:`\partial^{\text{guided}} y^c / \partial x`: ``(N, *x)``, or ``(N, T, *x)``.

    ``targets`` are those of the Grad-CAM pass (resolved class indices, or the callable).
    """
    if not inputs.is_floating_point():
        raise TypeError(f"guided=True differentiates w.r.t. the inputs, which must be floating, got {inputs.dtype}")
    x = inputs.detach().requires_grad_(True)
    mode = GuidedReLUs()
    with torch.enable_grad(), mode:
        if isinstance(model, (tuple, list)):
            scores = _run(model[1], _run(model[0], x.clone()))
        else:
            scores = _run(model, x.clone())  # a copy: in-place ops on it leave x (and inputs) alone
    if not mode.counts:
        warnings.warn(
            "guided=True but the model called no ReLU that the guided pass recognises (see the "
            "torch backend's docstring): guided_backprop is the plain gradient w.r.t. the inputs",
            NoGuidedReLUWarning,
            stacklevel=4,
        )
    return _gradients(scores, x, targets, "the inputs")


class _GuidedReLU(torch.autograd.Function):
    r"""A ReLU form ``func(*args, **kwargs)`` with the guided backward rule.

    Forward: the call itself, so the numbers (and the in-place behaviour) are the original's.
    Backward, with y the output and b = ``upper`` (:math:`\infty` when None):
    :math:`g \mapsto g \cdot [0 < y < b] \cdot [g > 0]`. Since y = z on ``0 < z < b`` and y is
    clamped to 0 or b elsewhere, :math:`[0 < y < b] = [0 < z < b]` for the input z; reading the
    output lets in-place calls (whose input is overwritten) use the same rule.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, func: Callable[..., torch.Tensor], args: tuple[Any, ...],
                kwargs: dict[str, Any], upper: float | None, inplace: bool) -> torch.Tensor:
        y = func(*args, **kwargs)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        ctx.upper = upper
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        keep = (y > 0) & (g > 0)
        if ctx.upper is not None:
            keep = keep & (y < ctx.upper)
        return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device)), None, None, None, None, None


class GuidedReLUs(TorchFunctionMode):
    """While active, every recognised ReLU call gets the guided backward rule.

    A ``torch.overrides.TorchFunctionMode``: ``with GuidedReLUs() as mode: scores = model(x)``
    builds a graph whose backward passes are guided at every ReLU called inside the block (see
    the module docstring for the rule and the recognised calls); the forward numbers are
    unchanged. Calls outside autograd (grad mode off, or an input that does not require grad)
    run as they are. ``counts`` tells how many calls of each function were guided.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        form = _RELU_FORMS.get(func)
        if form is not None and torch.is_grad_enabled():
            name, parse = form
            parsed = None if "out" in kwargs else parse(args, kwargs)
            if parsed is not None:
                x, upper, inplace = parsed
                if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point():
                    self.counts[name] += 1
                    return _GuidedReLU.apply(x, func, args, kwargs, upper, inplace)
        return func(*args, **kwargs)


_Parsed = tuple[Any, float | None, bool] | None  # (input, upper bound or None, in place) or None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _is_number(v: Any, value: float | None = None) -> bool:
    """A real Python/NumPy number (not a bool, not a tensor), equal to ``value`` if given."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, torch.Tensor))
    return ok and (value is None or v == value)


def _upper(v: Any) -> float | None:
    """The cap b of a capped ReLU; None for no cap (None or +inf)."""
    if v is None or v == math.inf:
        return None
    return float(v)


# Each parser reads a call's arguments (positional or keyword, as the function's signature has
# them) and returns (input, cap, in place), or None when the call is not a ReLU. ``inplace=None``
# reads the ``inplace`` argument of the ``F.*`` functions.


def _relu_form(inplace: bool | None, upper: float | None = None) -> Callable[..., _Parsed]:
    """``relu(input[, inplace])``, or ``relu6`` with ``upper=6``."""
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        flag = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input"), upper, flag
    return parse


def _hardtanh_form(inplace: bool | None) -> Callable[..., _Parsed]:
    """``hardtanh(input, min_val=-1, max_val=1[, inplace])``: a ReLU capped at max_val if min_val == 0."""
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        if not (_is_number(low, 0) and _is_number(high)):
            return None
        flag = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input"), _upper(high), flag
    return parse


def _clamp_form(inplace: bool, has_max: bool = True) -> Callable[..., _Parsed]:
    """``clamp(input, min=None, max=None)`` (``clamp_min(input, min)``): a ReLU if min == 0."""
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        low = _arg(args, kwargs, 1, "min")
        high = _arg(args, kwargs, 2, "max") if has_max else None
        if not (_is_number(low, 0) and (high is None or _is_number(high))):
            return None
        return _arg(args, kwargs, 0, "input"), _upper(high), inplace
    return parse


def _threshold_form(inplace: bool | None) -> Callable[..., _Parsed]:
    """``threshold(input, threshold, value[, inplace])``: a ReLU if threshold == value == 0."""
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        at, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
        if not (_is_number(at, 0) and _is_number(value, 0)):
            return None
        flag = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return _arg(args, kwargs, 0, "input"), None, flag
    return parse


_RELU_FORMS: dict[Any, tuple[str, Callable[..., _Parsed]]] = {
    F.relu: ("relu", _relu_form(None)),
    torch.relu: ("relu", _relu_form(False)),
    torch.Tensor.relu: ("relu", _relu_form(False)),
    torch.relu_: ("relu", _relu_form(True)),  # also F.relu_
    torch.Tensor.relu_: ("relu", _relu_form(True)),
    F.relu6: ("relu6", _relu_form(None, 6.0)),
    torch._C._nn.relu6: ("relu6", _relu_form(False, 6.0)),
    torch._C._nn.relu6_: ("relu6", _relu_form(True, 6.0)),
    F.hardtanh: ("hardtanh", _hardtanh_form(None)),  # nn.ReLU6, nn.Hardtanh
    torch._C._nn.hardtanh: ("hardtanh", _hardtanh_form(False)),
    torch._C._nn.hardtanh_: ("hardtanh", _hardtanh_form(True)),  # also F.hardtanh_
    F.threshold: ("threshold", _threshold_form(None)),  # nn.Threshold
    torch.threshold: ("threshold", _threshold_form(False)),
    torch.threshold_: ("threshold", _threshold_form(True)),  # also F.threshold_
    **{f: ("clamp", _clamp_form(False)) for f in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)},
    **{f: ("clamp", _clamp_form(True)) for f in (torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_)},
    torch.clamp_min: ("clamp", _clamp_form(False, has_max=False)),
    torch.Tensor.clamp_min: ("clamp", _clamp_form(False, has_max=False)),
    torch.clamp_min_: ("clamp", _clamp_form(True, has_max=False)),
    torch.Tensor.clamp_min_: ("clamp", _clamp_form(True, has_max=False)),
}
"""The ReLU forms the guided pass recognises: function -> (name for counts, argument parser)."""


# --- layers, models, reshapes -------------------------------------------------------------------


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[nn.Module, str]:
    """The module ``layer`` names (or is) in ``model``, and its dotted name."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules(remove_duplicate=False):
            if module is layer:
                return module, name
        raise ValueError(
            f"layer is a {type(layer).__name__} that is not a submodule of {type(model).__name__}"
        )
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), layer
        except AttributeError:
            pass
    elif layer is not None:
        raise TypeError(f"layer must be a dotted name (str) or an nn.Module, got {type(layer).__name__}")
    names = [name for name, _ in model.named_modules()][1:]  # [0] is "", the model itself
    if layer is None:
        raise ValueError(
            f"layer is required: a dotted name of a submodule of {type(model).__name__} "
            f"(e.g. {names[-3:]}) or the module itself"
        )
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.6)
    hint = f"did you mean {close}?" if close else f"its submodules include {names[:5]} ... {names[-3:]}"
    raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}; {hint}")


def _split_form(
    model: tuple[Any, ...] | list[Any], layer: Any, at: str, call: int | None
) -> tuple[nn.Module, nn.Module]:
    if len(model) != 2 or not all(isinstance(m, nn.Module) for m in model):
        raise TypeError(
            f"the split form of model is a pair (features, head) of nn.Modules, "
            f"got {[type(m).__name__ for m in model]}"
        )
    if layer is not None or at != "output" or call is not None:
        raise ValueError(
            "in the split form (features, head) the layer is the output of features: "
            f"leave layer, at and call unset (got layer={layer!r}, at={at!r}, call={call!r})"
        )
    return model[0], model[1]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _warn_if_training(*models: nn.Module) -> None:
    """Warn when a module that may behave differently in training mode is in it.

    Containers are skipped: slicing an eval model (``model[:4]``) gives a new ``nn.Sequential``
    in training mode whose children are still in eval mode.
    """
    if any(m.training for model in models for m in model.modules() if type(m) not in _CONTAINERS):
        warnings.warn(
            "the model is in training mode: dropout and batch-norm make Grad-CAM maps random and "
            "mix examples; call model.eval() first",
            UserWarning,
            stacklevel=4,
        )


def _reshape(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token activations ``(N, T, D)`` and their gradients to ``(N, D, *grid)`` layout."""
    multi = gradients.ndim == activations.ndim + 1
    if callable(reshape):
        a = reshape(activations)
        g = gradients.flatten(0, 1) if multi else gradients
        g = reshape(g)
        if multi:
            g = g.reshape(*gradients.shape[:2], *g.shape[1:])
        return a, g
    grid = tuple(int(s) for s in reshape)
    if activations.ndim != 3 or not grid or min(grid) < 1:
        raise ValueError(
            f"reshape={tuple(reshape)} turns token activations (N, T, D) into (N, D, *grid): "
            f"got activations of shape {shape_of(activations)}"
        )
    tokens = int(activations.shape[1])
    if tokens < math.prod(grid):
        raise ValueError(
            f"reshape={grid} needs at least {math.prod(grid)} tokens, the layer has T = {tokens} "
            f"(activations {shape_of(activations)})"
        )
    return _tokens_to_grid(activations, grid), _tokens_to_grid(gradients, grid)


def _tokens_to_grid(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(..., T, D)`` -> ``(..., D, *grid)``: drop the first ``T - prod(grid)`` tokens."""
    kept = x[..., x.shape[-2] - math.prod(grid):, :]
    return kept.reshape(*x.shape[:-2], *grid, x.shape[-1]).movedim(-1, -1 - len(grid))
