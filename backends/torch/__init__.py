r"""The PyTorch backend: Grad-CAM of any ``nn.Module`` at any layer, for any differentiable score.

How a call runs, and why it costs about one forward pass (the full account: docs/backends.md):

1. ``_forward``: the model runs under ``torch.no_grad()`` up to ``layer`` (for ``at="input"`` with
   grad: other modules may read that tensor too, and dy/dA sums their paths); a forward hook takes
   :math:`A`, makes it a leaf that requires grad, turns grad mode on for the rest of the pass and
   hands the model a copy (in-place ops downstream leave :math:`A` alone; no backward hook).
2. ``_backward``: ``torch.autograd.grad(score, [A])`` from the score to the layer only (no
   parameter gets a ``.grad``), with two exact shortcuts for linear heads; one batched backward
   for ``(N, T)`` targets.
3. ``_state``: every hook, mode, buffer and random state is as it was afterwards, also when the
   model raises. ``_tokens``: token layers as grids (``reshape``). ``_perturb`` and ``_scoring``:
   re-scoring for Score-CAM and Ablation-CAM. ``guided``: :class:`GuidedReLUs`.

``guided=True`` runs a second pass under :class:`~gradcam_ref.backends.torch.guided.GuidedReLUs`.
``differentiable="stop" | "full"`` (GAIN training, :mod:`gradcam_ref.gain`) changes steps 1-2: the
whole forward pass runs with grad (the part before the layer too), :math:`A` stays in the graph,
the graph is retained, and maps, activations and scores come back attached, from one forward
pass (so in training mode the map and the score see the same dropout and batch statistics).
``"stop"``: the gradients, hence :math:`\alpha^c`, are constants; ``"full"``: ``create_graph=True``,
a second-order backward runs through :math:`\alpha^c` when the loss is differentiated.
The split form ``(features, head)`` takes :math:`A` = ``features(inputs)``, scores ``head(A)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcam_ref.backends._contract import (
    Capture,
    Explanation,
    NoGuidedReLUWarning,
    check_feature_maps,
    differentiable_mode,
    grad_cam_fields,
    resolve_targets,
    same_parameters,
    shape_of,
)
from gradcam_ref.backends.torch import _backward, _forward, _state, _tokens
from gradcam_ref.backends.torch._perturb import perturb
from gradcam_ref.backends.torch.guided import GuidedReLUs

NAME = "torch"
GUIDED = True
DIFFERENTIABLE = True
AT = _forward.AT

__all__ = ["AT", "DIFFERENTIABLE", "GUIDED", "NAME", "capture", "explain", "perturb", "score"]


_ZERO_CHECKS: contextvars.ContextVar[list[tuple[torch.Tensor, int, str]] | None] = contextvars.ContextVar(
    "_ZERO_CHECKS", default=None)
"""Set by :func:`explain` around its :func:`capture`: the zero-gradient checks it runs itself,
once Eq. 1's weights are known, instead of capture's search of the gradients."""


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
    differentiable: bool | str = False,
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
      differentiable: False (inference: tensors detached), ``"stop"`` or ``"full"`` (module
        docstring): activations, scores and the maps built from them carry autograd to the
        model's parameters and inputs.

    Returns:
      ``Capture(activations (N, K, *spatial), gradients (N, K, *spatial) or
      (N, T, K, *spatial), scores, targets, guided_backprop)``, tensors detached, on the model's
      device; ``guided_backprop`` is ``(N, *inputs.shape[1:])``, ``(N, T, *inputs.shape[1:])``
      or None.
    """
    captured, where = _capture(model, inputs, target, layer, at, call, reshape, guided, differentiable)
    deferred = _ZERO_CHECKS.get()
    if deferred is None:
        _backward.warn_if_zero_gradients(captured.gradients, int(captured.activations.ndim), where, stacklevel=3)
    else:
        deferred.append((captured.gradients, int(captured.activations.ndim), where))
    return captured


@same_parameters(capture)
def explain(*args: Any, **kwargs: Any) -> Explanation:
    """``Explanation.from_capture(capture(...))``, same arguments (see :func:`capture`).

    The zero-gradient check reads the weights :math:`\\alpha` first: a non-zero weight proves
    its gradients non-zero, so the gradients themselves are searched only when a row of weights
    is all zero (one small read-back instead of a pass over ``(N, T, K, *spatial)``).
    """
    deferred: list[tuple[torch.Tensor, int, str]] = []
    token = _ZERO_CHECKS.set(deferred)
    try:
        captured = capture(*args, **kwargs)
    finally:
        _ZERO_CHECKS.reset(token)
    fields = grad_cam_fields(captured)
    for gradients, rank, where in deferred:
        _backward.warn_if_zero_gradients(gradients, rank, where, fields.weights)
    return Explanation.from_capture(captured, fields)


def _capture(
    model: nn.Module | tuple[nn.Module, nn.Module],
    inputs: torch.Tensor,
    target: Any,
    layer: str | nn.Module | None,
    at: str,
    call: int | None,
    reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor] | None,
    guided: bool,
    differentiable: bool | str = False,
) -> tuple[Capture, str]:
    """:func:`capture` but the zero-gradient check; also returns where A was taken, for messages."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, ...), got {type(inputs).__name__}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {shape_of(inputs)}")
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, got {at!r}")
    if call is not None and (isinstance(call, bool) or not isinstance(call, (int, np.integer))):
        raise TypeError(f"call must be None or an int, got {call!r}")
    attached = differentiable_mode(differentiable, guided)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("explain needs autograd after the layer: call it outside torch.inference_mode()")
    if reshape is not None and not callable(reshape):
        reshape = _tokens.grid_sizes(reshape)

    if isinstance(model, (tuple, list)):
        features, head = _forward.split_form(model, layer, at, call)
        parts: tuple[nn.Module, ...] = (features, head)
    elif isinstance(model, nn.Module):
        module, name = _forward.resolve_layer(model, layer)
        parts = (model,)
    else:
        raise TypeError(f"model must be an nn.Module or a (features, head) pair, got {type(model).__name__}")
    _forward.check_has_data(inputs)
    # differentiable: this forward pass is the user's training step (GAIN), so the model is not
    # restored and training mode is expected; otherwise it is left exactly as it was.
    training = False if attached else _state.warn_if_training(*parts)
    kept = _state.kept_as_it_was(parts, inputs.device) if training else contextlib.nullcontext(_state.nothing)
    with kept as rewind, contextlib.ExitStack() if at == "input" else contextlib.nullcontext() as undo:
        if isinstance(model, (tuple, list)):
            leaf, scores = _forward.split(features, head, inputs, bool(attached))
            where = "the output of features"
        else:
            where = f"the {at} of layer {name!r}"
            index = call
            if call is not None and call < 0:
                runs = _forward.count_calls(model, module, name, at, inputs)
                if runs + call < 0:
                    raise ValueError(f"call={call} but layer {name!r} ran {runs} time(s) in the forward pass")
                index = runs + call
                rewind()  # the counting pass drew random numbers: the pass that counts draws the same
            leaf, scores = _forward.hooked(model, module, name, at, index, inputs, bool(attached), undo, rewind)

        _forward.check_captured(leaf, scores, inputs, where)
        if not callable(target):
            _forward.warn_if_probabilities(scores, model)
        targets = resolve_targets(target, scores)
        try:
            gradients = _backward.gradients(scores, leaf, targets, where, attached)
        except RuntimeError as error:
            if "use_reentrant" not in str(error):
                raise
            raise ValueError(
                f"the model runs torch.utils.checkpoint(use_reentrant=True) between {where} and the "
                "score, which torch.autograd.grad cannot differentiate: use use_reentrant=False"
            ) from error
        if not attached:  # the graph's last reference: a retained graph (sparse seeds) goes now
            scores = scores.detach()
        activations = leaf if attached else leaf.detach()
        if reshape is not None:
            activations, gradients = _tokens.to_grid(activations, gradients, reshape)
        check_feature_maps("activations", activations)
        guided_backprop = None
        if guided:
            rewind()  # the guided pass draws the dropout masks of the Grad-CAM pass
            guided_backprop = _guided_backprop(model, inputs, targets)
    captured = Capture(
        activations, gradients, scores, None if callable(targets) else targets,
        guided_backprop,
    )
    return captured, where


def score(model: nn.Module | tuple[nn.Module, nn.Module], inputs: Any) -> torch.Tensor:
    """``model(inputs)`` under ``torch.no_grad()``: the scores ``(N, classes)``, for re-scoring.

    NumPy (or other) ``inputs`` become a tensor of the model's first floating parameter's dtype and
    device (float32 on the CPU for a model without parameters); a tensor keeps its dtype and
    device. The split form ``(features, head)`` runs ``head(features(inputs))``. The model runs on
    a copy of the inputs; its buffers and torch's random state are kept as they were, as in
    :func:`capture` (:func:`_state.warn_if_training`): nothing of the model or the inputs changes.
    """
    parts = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    if not all(isinstance(m, nn.Module) for m in parts):
        raise TypeError(f"model must be an nn.Module or a pair of them, got {[type(m).__name__ for m in parts]}")
    keep = _state.warn_if_training(*parts)
    if not isinstance(inputs, torch.Tensor):
        floating = [p for m in parts for p in m.parameters() if p.is_floating_point()]
        dtype, device = (floating[0].dtype, floating[0].device) if floating else (torch.float32, "cpu")
        inputs = torch.as_tensor(np.asarray(inputs), dtype=dtype, device=device)
    with _state.kept_as_it_was(parts, inputs.device) if keep else contextlib.nullcontext(), torch.no_grad():
        out = inputs.clone()  # a copy: the model may write into its input (as_tensor shares NumPy's memory)
        for part in parts:
            out = _forward.run(part, out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != inputs.shape[0]:
        got = f"shape {shape_of(out)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return scores (N, classes) for N = {inputs.shape[0]} inputs, got {got}")
    return out


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
            scores = _forward.run(model[1], _forward.run(model[0], x.clone()))
        else:
            scores = _forward.run(model, x.clone())  # a copy: in-place ops on it leave x (and inputs) alone
    if not mode.counts:
        warnings.warn(
            "guided=True but the model called no ReLU that the guided pass recognises (see the "
            "torch backend's docstring): guided_backprop is the plain gradient w.r.t. the inputs",
            NoGuidedReLUWarning,
            stacklevel=4,
        )
    return _backward.gradients(scores, x, targets, "the inputs")

