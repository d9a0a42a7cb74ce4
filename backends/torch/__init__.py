r"""The PyTorch backend: Grad-CAM of any ``nn.Module`` at any layer, for any differentiable score.

How a call runs, and why it costs about one forward pass (the full account: docs/backends.md):

1. The model runs under ``torch.no_grad()`` up to ``layer``: the part before it builds no graph.
2. A forward hook (a pre-hook for ``at="input"``) takes :math:`A`, makes it a leaf that requires
   grad, turns grad mode on for the rest of the pass and hands the model a copy (so in-place ops
   downstream leave :math:`A` alone; no backward hook, so pytorch #61519 cannot arise).
3. ``torch.autograd.grad(score, [A])`` runs the backward from the score to the layer only: no
   parameter gets a ``.grad``. ``(N, T)`` targets are one batched backward (``is_grads_batched``).
4. Every hook, mode and flag is restored in ``finally`` blocks, also when the model raises.

``guided=True`` runs a second pass under :class:`~gradcam_ref.backends.torch.guided.GuidedReLUs`.
The split form ``(features, head)`` takes :math:`A` = ``features(inputs)``, scores ``head(A)``.
"""

from __future__ import annotations

import difflib
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcam_ref.backends._contract import (
    Capture,
    NoGuidedReLUWarning,
    Perturbed,
    TrainingModeWarning,
    ZeroGradientWarning,
    check_feature_maps,
    check_target_scores,
    explaining,
    resolve_targets,
    shape_of,
)
from gradcam_ref.backends.torch.guided import GuidedReLUs

NAME = "torch"
GUIDED = True
AT = ("output", "input")

__all__ = ["AT", "GUIDED", "NAME", "capture", "explain", "perturb"]


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
        check_target_scores(y, n)
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
            TrainingModeWarning,
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


explain = explaining(capture)


# --- re-scoring perturbed copies (Score-CAM, Ablation-CAM) ----------------------------------------


def perturb(
    model: nn.Module | tuple[nn.Module, nn.Module],
    inputs: torch.Tensor,
    make: Callable[..., torch.Tensor],
    *,
    layer: str | nn.Module | None = None,
    where: str = "activations",
    batch_size: int = 32,
    at: str = "output",
    call: int | None = None,
) -> Perturbed:
    """Score perturbed copies of each example without autograd (the Protocol's ``perturb``).

    ``where="activations"`` runs only the part of the model after the layer: ``head`` in the
    split form; otherwise the part of the model's ``torch.fx`` graph that depends on the layer's
    output (its tail), when the model traces and that part needs nothing else computed before
    the layer. Else (untraceable models, skip connections around the layer) it falls back to
    the whole model on the example repeated, with a forward hook substituting the perturbed
    activations (the part before the layer then runs again for every batch).
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, ...), got {type(inputs).__name__}")
    if where not in ("activations", "inputs"):
        raise ValueError(f"where must be 'activations' or 'inputs', got {where!r}")
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, got {at!r}")
    with torch.no_grad():
        if isinstance(model, (tuple, list)):
            features, head = _split_form(model, layer, at, call)
            _warn_if_training(features, head)
            a = _run(features, inputs)
            scores = _run(head, a)
            whole: Callable[[torch.Tensor], Any] = lambda v: head(features(v))  # noqa: E731
            tail: Callable[[torch.Tensor], Any] | None = head
            name, module = "features", None
        else:
            module, name = _resolve_layer(model, layer)
            _warn_if_training(model)
            a, scores = _forward_taken(model, module, name, at, call, inputs)
            whole = model
            tail = _tail(model, name) if where == "activations" and at == "output" and call is None else None
        _check_captured(a, scores, inputs, f"the {at} of layer {name!r}")
        check_feature_maps("activations", a)
        n, k = int(a.shape[0]), int(a.shape[1])
        rows = torch.empty((n, k, *scores.shape[1:]), dtype=scores.dtype, device=scores.device)
        for i in range(n):
            for start in range(0, k, batch_size):
                stop = min(start + batch_size, k)
                batch = make(inputs, a, i, start, stop)
                if where == "inputs":
                    out = _run(whole, batch)  # type: ignore[arg-type]
                elif tail is not None:
                    out = tail(batch)
                else:
                    repeated = inputs[i:i + 1].expand(stop - start, *inputs.shape[1:])
                    out = _substituted(model, module, at, call, repeated, batch)  # type: ignore[arg-type]
                rows[i, start:stop] = out
    return Perturbed(a, scores, rows)


def _forward_taken(
    model: nn.Module, module: nn.Module, name: str, at: str, call: int | None, inputs: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """One no-grad forward pass: the layer's ``at`` at call ``call`` (detached), and the scores."""
    taken: list[torch.Tensor] = []

    def keep(value: Any) -> None:  # a copy now: an in-place op after the layer would change it
        taken.append(value.detach().clone() if isinstance(value, torch.Tensor) else value)

    if at == "output":
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    try:
        scores = _run(model, inputs)
    finally:
        handle.remove()
    if not taken:
        raise ValueError(f"layer {name!r} never ran in the forward pass of {type(model).__name__}")
    if call is None and len(taken) > 1:
        raise ValueError(f"layer {name!r} ran {len(taken)} times in one forward pass: pass call=i to pick one")
    value = taken[0 if call is None else call]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"the {at} of layer {name!r} must be one floating-point tensor (N, K, *spatial)")
    return value, scores


def _substituted(model: nn.Module, module: nn.Module, at: str, call: int | None, inputs: torch.Tensor,
                 replacement: torch.Tensor) -> Any:
    """``model(inputs)`` with the layer's ``at`` (at call ``call``) replaced by ``replacement``."""
    calls = [0]
    index = 0 if call is None else call

    def swap(value: Any) -> Any:
        this = calls[0]
        calls[0] += 1
        return replacement if this == index or (index < 0 and this == -1) else value

    if at == "output":
        handle = module.register_forward_hook(lambda m, args, out: swap(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (swap(args[0]), *args[1:]))
    try:
        return _run(model, inputs)
    finally:
        handle.remove()


_TAILS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[int, ...], Any]]] = weakref.WeakKeyDictionary()
"""Traced tails per model and layer, with the ids of the model's modules when traced: a model
whose modules were replaced since is traced again; a model that is deleted drops its entry."""


def _tail(model: nn.Module, name: str) -> Callable[[torch.Tensor], Any] | None:
    """The part of ``model`` after submodule ``name``, as a ``torch.fx.GraphModule`` of its output.

    None when the model does not trace, the layer is called more than once, or the part after
    it reads a value computed before it (e.g. a skip connection around the layer).
    """
    import torch.fx

    structure = tuple(id(m) for m in model.modules())
    cached = _TAILS.setdefault(model, {}).get(name)
    if cached is not None and cached[0] == structure:
        return cached[1]

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return qualified_name == name or super().is_leaf_module(m, qualified_name)

    tail: Any = None
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace: use the hooked fallback
        graph = None
    if graph is not None:
        nodes = list(graph.nodes)
        seams = [node for node in nodes if node.op == "call_module" and node.target == name]
        if len(seams) == 1:
            tail = _graph_after(model, nodes, seams[0])
    _TAILS[model][name] = (structure, tail)
    return tail


def _graph_after(model: nn.Module, nodes: list[Any], seam: Any) -> Any:
    import torch.fx

    after = {seam}
    for node in nodes[nodes.index(seam) + 1:]:
        if any(arg in after for arg in node.all_input_nodes):
            after.add(node)
    new = torch.fx.Graph()
    env = {seam: new.placeholder("activations")}
    for node in nodes[nodes.index(seam) + 1:]:
        if node not in after:
            continue
        for arg in node.all_input_nodes:
            if arg in env:
                continue
            if arg.op != "get_attr":
                return None  # the tail needs a value from before the layer
            env[arg] = new.node_copy(arg, lambda x: env[x])
        env[node] = new.node_copy(node, lambda x: env[x])
    if not any(node.op == "output" for node in after):
        return None
    return torch.fx.GraphModule(model, new)
