r"""The PyTorch backend: Grad-CAM of any ``nn.Module`` at any layer, for any differentiable score.

How a call runs, and why it costs about one forward pass (the full account: docs/backends.md):

1. The model runs under ``torch.no_grad()`` up to ``layer``: the part before it builds no graph
   (for ``at="input"`` it does: other modules may read that tensor too, and dy/dA sums their paths).
2. A forward hook (a pre-hook for ``at="input"``) takes :math:`A`, makes it a leaf that requires
   grad, turns grad mode on for the rest of the pass and hands the model a copy (so in-place ops
   downstream leave :math:`A` alone; no backward hook, so pytorch #61519 cannot arise).
3. ``torch.autograd.grad(score, [A])`` runs the backward from the score to the layer only: no
   parameter gets a ``.grad``. Through a linear layer of a global average the chain rule is taken
   by hand down to the average's input (``_pooled_seeds``); other scores straight out of a linear
   layer get sparse one-hot seeds (``_sparse_seeded``), one pass per target when only pooling and
   elementwise ops lie between (``_light_below``); other ``(N, T)`` targets are one batched
   backward (``is_grads_batched``).
4. Every hook, mode and flag is restored in ``finally`` blocks, also when the model raises.

``guided=True`` runs a second pass under :class:`~gradcam_ref.backends.torch.guided.GuidedReLUs`.
``differentiable="stop" | "full"`` (GAIN training, :mod:`gradcam_ref.gain`) changes steps 1-3: the
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
import difflib
import itertools
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.nn.utils.spectral_norm import SpectralNorm

from gradcam_ref.backends._contract import (
    Capture,
    Explanation,
    NoGuidedReLUWarning,
    Perturbed,
    ProbabilityScoresWarning,
    TrainingModeWarning,
    check_feature_maps,
    check_same_batch,
    check_target_scores,
    check_where,
    differentiable_mode,
    grad_cam_fields,
    perturb_chunks,
    probabilities_message,
    resolve_targets,
    same_parameters,
    shape_of,
    warn_zero_gradients,
)
from gradcam_ref.backends.torch import _scoring
from gradcam_ref.backends.torch.guided import GuidedReLUs

NAME = "torch"
GUIDED = True
DIFFERENTIABLE = True
AT = ("output", "input")

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
        _warn_zero_gradients(captured.gradients, int(captured.activations.ndim), where, stacklevel=3)
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
        _warn_zero_gradients(gradients, rank, where, fields.weights)
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
        reshape = _grid(reshape)

    if isinstance(model, (tuple, list)):
        features, head = _split_form(model, layer, at, call)
        parts: tuple[nn.Module, ...] = (features, head)
    elif isinstance(model, nn.Module):
        module, name = _resolve_layer(model, layer)
        parts = (model,)
    else:
        raise TypeError(f"model must be an nn.Module or a (features, head) pair, got {type(model).__name__}")
    _check_has_data(inputs)
    # differentiable: this forward pass is the user's training step (GAIN), so the model is not
    # restored and training mode is expected; otherwise it is left exactly as it was.
    training = False if attached else _warn_if_training(*parts)
    with _kept_as_it_was(parts, inputs.device) if training else contextlib.nullcontext(_nothing) as rewind, \
            contextlib.ExitStack() if at == "input" else contextlib.nullcontext() as undo:
        if isinstance(model, (tuple, list)):
            leaf, scores = _forward_split(features, head, inputs, bool(attached))
            where = "the output of features"
        else:
            where = f"the {at} of layer {name!r}"
            index = call
            if call is not None and call < 0:
                runs = _count_calls(model, module, name, at, inputs)
                if runs + call < 0:
                    raise ValueError(f"call={call} but layer {name!r} ran {runs} time(s) in the forward pass")
                index = runs + call
                rewind()  # the counting pass drew random numbers: the pass that counts draws the same
            leaf, scores = _forward_hooked(model, module, name, at, index, inputs, bool(attached), undo, rewind)

        _check_captured(leaf, scores, inputs, where)
        if not callable(target):
            _warn_if_probabilities(scores, model)
        targets = resolve_targets(target, scores)
        try:
            gradients = _gradients(scores, leaf, targets, where, attached)
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
            activations, gradients = _reshape(activations, gradients, reshape)
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


# --- the forward pass ---------------------------------------------------------------------------


def _nothing() -> None:
    """``rewind`` of a model in eval mode: nothing to set back."""


class _Probe:
    """Hook that takes A at the ``index``-th call of a module and starts the graph there.

    ``index`` None means "the only call": A is taken at the first call and the caller checks
    afterwards that there was no other.
    """

    def __init__(self, index: int | None, at: str, name: str, attached: bool = False,
                 undo: contextlib.ExitStack | None = None) -> None:
        self.attached = attached
        self.undo = undo
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
        # attached (differentiable=...): A stays in the graph of everything before the layer.
        if self.at == "input" and not self.attached:
            leaf = self._connected(value)
        else:
            leaf = value if self.attached and value.requires_grad else value.detach().requires_grad_(True)
        self.leaf, self.version = leaf, leaf._version
        torch.set_grad_enabled(True)  # the rest of the forward pass builds the graph
        return leaf.clone()  # a non-leaf copy: in-place ops downstream leave `leaf` alone

    def _connected(self, value: torch.Tensor) -> torch.Tensor:
        """A module's input as the tensor itself, so that dy/dA sums every path from it to the score.

        Other modules may read the same tensor (a skip connection around the layer): a detached
        copy handed to the layer alone would miss their paths. The pass runs with grad from the
        start (:func:`_forward_hooked`), so A is in the graph when it depends on the inputs or
        the weights; a tensor without history (one that depends on neither) is made to require
        grad in place, and set back afterwards: modules that read it before the layer are then
        not seen.
        """
        if value.requires_grad:
            return value
        if not value.is_leaf or self.undo is None:
            return value.detach().requires_grad_(True)
        value.requires_grad_(True)
        self.undo.callback(value.requires_grad_, False)
        return value

    def output_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self._take(output)

    def input_hook(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if not args:
            raise TypeError(f"layer {self.name!r} was called without a positional input; use at='output'")
        copy = self._take(args[0])
        return None if copy is None else (copy, *args[1:])


def _forward_hooked(
    model: nn.Module, module: nn.Module, name: str, at: str, index: int | None, inputs: torch.Tensor,
    attached: bool = False, undo: contextlib.ExitStack | None = None, rewind: Callable[[], None] = _nothing,
) -> tuple[torch.Tensor, Any]:
    """One forward pass taking A (see :class:`_Probe`); no graph before the layer, except for
    ``attached`` and for ``at="input"``, whose tensor other modules may read too: there the
    graph runs from inputs that require grad (a detached copy), so that every path is seen.
    The model runs on a copy of ``inputs`` (a clone: differentiable, for ``attached``)."""

    def once() -> tuple[_Probe, Any]:
        probe = _Probe(index, at, name, attached, undo)
        if at == "output":
            handle = module.register_forward_hook(probe.output_hook)
        else:
            handle = module.register_forward_pre_hook(probe.input_hook)
        if at == "input" and not attached and undo is not None:
            copy = _in_the_graph(model, inputs, undo)
        else:
            copy = inputs.clone()  # a model that writes into its input in place leaves the caller's alone
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(attached or at == "input")  # inference: no graph before the layer
            return probe, _run(model, copy)
        finally:
            torch.set_grad_enabled(grad_mode)
            handle.remove()

    probe, scores = _hooks_seen(model, name, once, lambda result: result[0].calls > 0, rewind)
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


def _in_the_graph(model: nn.Module, inputs: torch.Tensor, undo: contextlib.ExitStack) -> torch.Tensor:
    """What the model runs on so that every tensor computed from its inputs or weights has history.

    Floating inputs: a copy of a leaf that requires grad (a copy, so that an in-place op of the
    model on its input, or inputs made under ``torch.inference_mode()``, work as they did; a
    differentiable copy of inputs that already require grad). Integer inputs (token ids): a copy,
    and the model's floating weights are made to require grad, and set back by ``undo``. The
    user's tensors are not changed.
    """
    if inputs.is_floating_point():
        return inputs.clone() if inputs.requires_grad else inputs.detach().clone().requires_grad_(True).clone()
    for parameter in model.parameters():
        if parameter.is_floating_point() and not parameter.requires_grad:
            parameter.requires_grad_(True)
            undo.callback(parameter.requires_grad_, False)
    return inputs.clone()


def _count_calls(model: nn.Module, module: nn.Module, name: str, at: str, inputs: torch.Tensor) -> int:
    """How many times ``module`` runs in one forward pass (an inference pass, no graph); at least once."""

    def once() -> int:
        calls = [0]

        def count(*_: Any) -> None:
            calls[0] += 1

        if at == "output":
            handle = module.register_forward_hook(count)
        else:
            handle = module.register_forward_pre_hook(count)
        try:
            with torch.no_grad():
                _run(model, inputs.clone())  # a copy: the model may write into its input
        finally:
            handle.remove()
        return calls[0]

    return int(_hooks_seen(model, name, once, lambda calls: calls > 0))


def _hooks_seen(model: nn.Module, name: str, run: Callable[[], Any], ran: Callable[[Any], bool],
                rewind: Callable[[], None] = _nothing) -> Any:
    """``run()``, a forward pass with a hook on layer ``name``, where ``ran`` says the hook ran.

    Where it did not and ``model`` holds a module compiled by ``torch.compile``: Dynamo reuses a
    graph compiled without hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by
    default), so a hook registered after the model's first call (under ``torch.no_grad()``, say)
    is skipped, and guarding hooks afterwards does not recompile it. The pass runs once more, from
    the same random state (``rewind``), with the compiled modules run eagerly
    (``torch.compiler.set_stance("force_eager")``: their own Python code, the uncompiled model's
    values; their compiled graphs are left as they are). Where the hook still did not run: a ValueError.
    """
    result = run()
    if ran(result):
        return result
    dynamo = sys.modules.get("torch._dynamo")
    compiled = dynamo is not None and any(isinstance(m, dynamo.eval_frame.OptimizedModule) for m in model.modules())
    if compiled:
        rewind()
        with torch.compiler.set_stance("force_eager"):
            result = run()
        if ran(result):
            return result
    raise ValueError(
        f"layer {name!r} never ran in the forward pass of {type(model).__name__}: pick a module that the "
        "forward pass calls" + (" (it did not run with the model's torch.compile'd modules run eagerly either)"
                                if compiled else "")
    )


def score(model: nn.Module | tuple[nn.Module, nn.Module], inputs: Any) -> torch.Tensor:
    """``model(inputs)`` under ``torch.no_grad()``: the scores ``(N, classes)``, for re-scoring.

    NumPy (or other) ``inputs`` become a tensor of the model's first floating parameter's dtype and
    device (float32 on the CPU for a model without parameters); a tensor keeps its dtype and
    device. The split form ``(features, head)`` runs ``head(features(inputs))``. The model runs on
    a copy of the inputs; its buffers and torch's random state are kept as they were, as in
    :func:`capture` (:func:`_warn_if_training`): nothing of the model or the inputs changes.
    """
    parts = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    if not all(isinstance(m, nn.Module) for m in parts):
        raise TypeError(f"model must be an nn.Module or a pair of them, got {[type(m).__name__ for m in parts]}")
    keep = _warn_if_training(*parts)
    if not isinstance(inputs, torch.Tensor):
        floating = [p for m in parts for p in m.parameters() if p.is_floating_point()]
        dtype, device = (floating[0].dtype, floating[0].device) if floating else (torch.float32, "cpu")
        inputs = torch.as_tensor(np.asarray(inputs), dtype=dtype, device=device)
    with _kept_as_it_was(parts, inputs.device) if keep else contextlib.nullcontext(), torch.no_grad():
        out = inputs.clone()  # a copy: the model may write into its input (as_tensor shares NumPy's memory)
        for part in parts:
            out = _run(part, out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != inputs.shape[0]:
        got = f"shape {shape_of(out)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return scores (N, classes) for N = {inputs.shape[0]} inputs, got {got}")
    return out


def _forward_split(
    features: nn.Module, head: nn.Module, inputs: torch.Tensor, attached: bool = False
) -> tuple[torch.Tensor, Any]:
    with torch.set_grad_enabled(attached):
        a = _run(features, inputs.clone())  # a copy: features may write into its input
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        kind = f"a {a.dtype} tensor" if isinstance(a, torch.Tensor) else type(a).__name__
        raise TypeError(f"features(inputs) must be one floating-point tensor (N, K, *spatial), got {kind}")
    leaf = a if attached and a.requires_grad else a.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = _run(head, leaf.clone())
    return leaf, scores


def _run(model: nn.Module, inputs: torch.Tensor) -> Any:
    """``model(inputs)``; an error from the model gets a note with the input's shape."""
    try:
        return model(inputs)
    except Exception as error:
        meta = _meta_tensor_of(model)  # the error path only: no cost on success
        if meta is not None:
            raise ValueError(
                f"the model's {meta!r} is on the meta device (shapes, no values): load its weights "
                "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)"
            ) from error
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(
                f"gradcam_ref: raised while running {type(model).__name__} on inputs of shape "
                f"{shape_of(inputs)} ({inputs.dtype}, {inputs.device})"
            )
        raise


_PROBABILITIES = {"SoftmaxBackward0": "softmax", "LogSoftmaxBackward0": "log_softmax"}
"""The backward nodes of a softmax output (``nn.Softmax``, ``F.softmax``, ``Tensor.softmax``; log too)."""


def _warn_if_probabilities(scores: torch.Tensor, model: Any) -> None:
    """Warn :class:`ProbabilityScoresWarning` when the model's last operation is a softmax."""
    name = _PROBABILITIES.get(type(scores.grad_fn).__name__)
    dim = getattr(scores.grad_fn, "_saved_dim", -1) if name is not None else -1
    dim = dim - 2**64 if dim >= 2**63 else dim  # torch reports -1 as an unsigned int
    if name is not None and scores.ndim >= 2 and dim % scores.ndim == scores.ndim - 1:  # over the classes
        warnings.warn(
            probabilities_message(type(model).__name__, name, "", f"the model without the final {name}"),
            ProbabilityScoresWarning,
            stacklevel=6,  # gradcam_ref.explain's caller
        )


def _check_captured(leaf: torch.Tensor, scores: Any, inputs: torch.Tensor, where: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"the model must return one tensor of scores, got {type(scores).__name__}; "
            "wrap it in a module that returns the tensor to explain"
        )
    check_same_batch(leaf, scores, inputs, where, "(N, K, *spatial)")


# --- the backward pass --------------------------------------------------------------------------


def _gradients(
    scores: torch.Tensor, leaf: torch.Tensor, targets: Any, where: str, attached: str | None = None
) -> torch.Tensor:
    r""":math:`\partial y^c / \partial A`: ``(N, K, *spatial)``, or ``(N, T, K, *spatial)``.

    ``attached``: None (the graph is freed), ``"stop"`` (kept, for the caller's loss) or
    ``"full"`` (kept, and the gradients are themselves differentiable: ``create_graph``).
    """
    n = int(scores.shape[0])
    if callable(targets):
        y = targets(scores)
        check_target_scores(y, n, scores)
        return _grad(y, leaf, torch.ones_like(y), where, attached=attached)
    if attached is None:  # a linear head: its chain rule by hand, or gathered rows
        pooled = _pooled_head(scores, leaf, targets, where)
        if pooled is not None:
            return pooled
        if targets.ndim == 1 or _light_below(scores):
            rows = _sparse_seeded(scores, leaf, targets[None] if targets.ndim == 1 else targets.T)
            if rows is not None:
                return rows[0] if targets.ndim == 1 else torch.stack(rows, dim=1)
    if targets.ndim == 1:  # seed[n, c] = 1 where c = targets[n]: sum_n y_n^{c_n}
        index = torch.as_tensor(targets[:, None], device=scores.device)
        seed = torch.zeros_like(scores).scatter_(1, index, 1.0)
        return _grad(scores, leaf, seed, where, attached=attached)
    # (N, T): T one-hot seeds, seeds[t, n, targets[n, t]] = 1, one batched backward pass.
    index = torch.as_tensor(targets.T[:, :, None], device=scores.device)
    seeds = torch.zeros((targets.shape[1], *scores.shape), dtype=scores.dtype, device=scores.device)
    seeds.scatter_(2, index, 1.0)
    return _grad(scores, leaf, seeds, where, batched=True, attached=attached).movedim(0, 1)


def _grad(
    y: torch.Tensor, leaf: torch.Tensor, seed: torch.Tensor, where: str, batched: bool = False,
    attached: str | None = None,
) -> torch.Tensor:
    """The vector-Jacobian product ``seed . dy/dleaf`` (a batch of them when ``batched``)."""
    retain = batched or attached is not None
    create = attached == "full"
    if y.grad_fn is None:
        return _reached(None, where)
    outputs = y
    grad_outputs: torch.Tensor | None = seed
    if not batched and not _symbolic_shapes_imported():
        # The scalar sum(seed * y) has the same vector-Jacobian product, to the bit (its backward
        # hands y exactly 1.0 * seed), and needs no grad_outputs tensor, whose shape check makes
        # torch import torch.fx's symbolic shapes (sympy: 1-2 s) on a process's first backward.
        # Once that module is imported (by anything), grad_outputs costs less: no product, no sum,
        # no two more nodes in the backward pass.
        with torch.enable_grad():  # explain may be called under torch.no_grad()
            outputs, grad_outputs = (y * seed).sum(), None
    try:
        if batched and attached is None:
            (g,) = _batched_grad(y, leaf, seed)
        else:
            (g,) = torch.autograd.grad(
                outputs, [leaf], grad_outputs=grad_outputs, retain_graph=retain, create_graph=create,
                allow_unused=True, is_grads_batched=batched,
            )
    except RuntimeError:
        if not batched:
            raise
        # vmap cannot batch some op of the model: one backward pass per target, same graph.
        rows = []
        for i, s in enumerate(seed):
            (row,) = torch.autograd.grad(
                y, [leaf], grad_outputs=s, retain_graph=i + 1 < len(seed) or attached is not None,
                create_graph=create, allow_unused=True,
            )
            rows.append(torch.zeros_like(leaf) if row is None else row)
        return torch.stack(rows)
    return _reached(g, where)


def _reached(g: torch.Tensor | None, where: str) -> torch.Tensor:
    """``g``, the gradient at ``where``; None (no autograd path from ``where`` to the score) is refused."""
    if g is None:
        raise ValueError(
            f"the score does not depend on {where}: no autograd path from it to the score (a layer run "
            "inside torch.utils.checkpoint(use_reentrant=True) has none either: use use_reentrant=False)"
        )
    return g


_SPARSE_SEEDED = frozenset({"AddmmBackward0", "MmBackward0"})
"""Backward formulas that take a sparse seed and hand a dense gradient on: ``mm`` and ``addmm``
(``nn.Linear``), whose gradient w.r.t. their first matrix is ``seed @ mat2^T``, a gather of
``mat2``'s seeded columns when the seed is sparse. (Most others refuse sparse gradients:
``reshape``, ``expand``, ``softmax``... are not implemented for them.)"""


def _sparse_seeded(y: torch.Tensor, leaf: torch.Tensor, columns: np.ndarray) -> list[torch.Tensor] | None:
    r""":math:`\partial y_{n, c_n} / \partial A` for each row ``c`` of ``columns`` ``(T, N)``, one backward
    pass each with a sparse one-hot seed; None where that does not apply (the caller seeds densely).

    Why: ``y = A' W^T + b`` (a linear head) has the backward ``seed @ W``, a dense
    ``(N, C) @ (C, K)`` product, as costly as the forward's, though the seed has one non-zero per
    row. torch's sparse ``mm`` turns it into a gather of the rows ``W[c_n]``: the same values (a
    dense sum of one product ``1 * W[c_n, k]`` and exact zeros), except where another class's row
    of ``W`` holds an Inf or NaN: there the dense product gives ``0 * inf = NaN``, the sparse one
    the true derivative ``W[c_n, k]``. Only for scores straight out of ``mm``/``addmm``
    (:data:`_SPARSE_SEEDED`); a pass that raises anyway or returns a sparse gradient gives None,
    and the graph is retained, so the caller's dense backward finds it whole.

    The seed goes to torch's engine directly (``torch.autograd.graph._engine_run_backward``,
    what ``torch.autograd.grad`` calls once it has checked ``grad_outputs``): that check imports
    ``torch.fx.experimental.symbolic_shapes`` (sympy, about a second on a process's first
    backward), and the engine checks the seed's shape, dtype and device itself. CPU only for now:
    the sparse product on other devices has not been checked against the dense one here.
    """
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if (run is None or y.grad_fn is None or y.grad_fn.name() not in _SPARSE_SEEDED or y.ndim != 2
            or type(y) is not torch.Tensor or type(leaf) is not torch.Tensor or y.layout != torch.strided
            or y.device.type != "cpu"):
        return None
    n = int(y.shape[0])
    ones = torch.ones(n, dtype=y.dtype)
    gradients = []
    try:
        for c in columns:  # indices (n, c_n) sorted by n, one per row: coalesced
            indices = torch.from_numpy(np.stack([np.arange(n, dtype=np.int64), c.astype(np.int64, copy=False)]))
            seed = torch.sparse_coo_tensor(indices, ones, y.shape, is_coalesced=True, check_invariants=False)
            (g,) = run((y,), (seed,), True, False, (leaf,), True, accumulate_grad=False)
            if g is None or g.layout != torch.strided:
                return None
            gradients.append(g)
    except (RuntimeError, TypeError):
        return None
    return gradients


_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                       "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0"})
"""Backward nodes of pure reshapes: each hands its gradient on reshaped to its input's sizes."""


def _pooled_head(scores: torch.Tensor, leaf: torch.Tensor, targets: np.ndarray, where: str) -> torch.Tensor | None:
    r""":math:`\partial y^c / \partial A` through :func:`_pooled_seeds` when the scores are a linear layer
    of a global average; None where they are not. From ``X`` on, torch's engine runs the rest: one
    batched pass for ``(N, T)`` targets (one pass a target where vmap cannot batch an op)."""
    found = _pooled_seeds(scores, leaf, targets)
    if found is None:
        return None
    edge, seeds, selections = found
    if targets.ndim == 2:
        selected = _selected(edge, leaf, seeds) if selections else None
        if selected is not None:
            return selected.movedim(0, 1)
        with contextlib.suppress(RuntimeError):  # vmap cannot batch some op below: one pass a target
            (g,) = _batched_grad(edge, leaf, seeds)
            return _written(_reached(g, where), leaf).movedim(0, 1)
    run = torch.autograd.graph._engine_run_backward
    rows = [_written(_reached(run((edge,), (seed,), i + 1 < len(seeds), False, (leaf,), True,
                                  accumulate_grad=False)[0], where), leaf) for i, seed in enumerate(seeds)]
    return rows[0] if targets.ndim == 1 else torch.stack(rows, dim=1)


def _batched_grad(y: torch.Tensor, leaf: torch.Tensor, seeds: torch.Tensor, create: bool = False) -> tuple[Any, ...]:
    """``torch.autograd.grad`` of ``y`` w.r.t. ``leaf`` for a batch of ``seeds``, vmap-batched, the graph
    retained (the caller's fallback, one pass a seed, needs it where vmap fails). A module compiled
    by ``torch.compile`` through AOTAutograd (aot_eager, inductor) may donate its saved buffers to
    its backward, which then refuses a retained graph ("donated buffers"): that pass is run once
    more without retaining, the only pass there is then."""
    def grad(retain: bool) -> tuple[Any, ...]:
        return torch.autograd.grad((y,), [leaf], grad_outputs=(seeds,), retain_graph=retain, create_graph=create,
                                   allow_unused=True, is_grads_batched=True)

    try:
        return grad(retain=True)
    except RuntimeError as error:
        if "donated buffers" not in str(error):
            raise
    return grad(retain=False)


_SELECTIONS = frozenset({"CloneBackward0", "ReluBackward0", "HardtanhBackward0", "ThresholdBackward0"})
"""Backward nodes that hand each position its incoming gradient or 0, by a mask of their saved input
or output alone (``where(mask, grad, 0)``): the identity, ReLU, ReLU6 and hardtanh, threshold."""


def _selections_only(node: Any, leaf: torch.Tensor, limit: int = 16) -> bool:
    """Whether the graph from ``node`` down to ``leaf`` is a chain of at most ``limit``
    :data:`_SELECTIONS` (EfficientNet's ReLU6, ResNet's identity): a gradient handed in comes out
    as a selection of its values, the same in any memory layout and for any seed."""
    for _ in range(limit):
        if node.name() not in _SELECTIONS:
            break
        below = [f for f, _ in node.next_functions if f is not None]
        if len(below) != 1:
            return False
        node = below[0]
    return node.name() == "torch::autograd::AccumulateGrad" and node.variable is leaf


def _selected(edge: Any, leaf: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor | None:
    r"""The ``(T, N, K, *S)`` gradients at ``leaf`` of T finite ``seeds`` at ``edge``, with only
    :data:`_SELECTIONS` between (:func:`_selections_only`); None for seeds not all finite.

    Each such backward is :math:`g \mapsto J \odot g` with the same 0/1 mask :math:`J` for every
    seed, so one pass of a seed of ones gives :math:`J`, and the T gradients are :math:`J \odot s_t`:
    one product instead of T passes (or one vmap-batched pass), each value the seed's or 0 as
    those give it (a zero's sign aside). An infinite or NaN seed would make :math:`0 \cdot \infty`:
    those take the passes.
    """
    first: tuple[Any, ...] = (..., *([0] * (leaf.ndim - 2)))  # (T, N, K): the one value of each channel
    if not bool(torch.isfinite(seeds[first]).all()):
        return None
    ones = torch.ones((), dtype=seeds.dtype, device=seeds.device).expand(leaf.shape)
    run = torch.autograd.graph._engine_run_backward
    mask = run((edge,), (ones,), True, False, (leaf,), True, accumulate_grad=False)[0]
    return _written(seeds, leaf) if 0 in mask.stride() else mask * seeds  # (the ones handed through)


def _written(g: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``g`` ``(N, K, *S)`` or ``(T, N, K, *S)`` itself, or a copy in ``leaf``'s layout when ``g`` is
    the expanded seeds handed through (no op between ``leaf`` and the average wrote them out)."""
    if 0 not in g.stride():
        return g
    like = torch.empty_like(leaf).stride()  # leaf's layout (dense)
    size = math.prod(leaf.shape)
    return torch.empty_strided(g.shape, (size,) * (g.ndim - leaf.ndim) + like, dtype=g.dtype,
                               device=g.device).copy_(g)


def _pooled_seeds(scores: torch.Tensor, leaf: torch.Tensor,
                  targets: np.ndarray) -> tuple[Any, torch.Tensor, bool] | None:
    r"""``(edge, seeds, selections)``: :math:`\partial y_{n, c_n} / \partial X` ``(T, N, K, *S)``, the
    edge into the average it flows back from and whether only selections lie between ``X`` and
    ``leaf`` (:func:`_selections_only`), when ``y = reshape(mean(X, spatial)) @ M (+ b)`` with ``X``
    ``(N, K, *S)`` computed from ``leaf`` (ResNet's, EfficientNet's, DenseNet's heads); else None.

    The chain rule through the linear layer, the reshapes and the average, taken by hand:

    .. math::

        \frac{\partial y_{n, c}}{\partial X_{n, k, s}} = \frac{M_{k, c}}{Z}, \qquad Z = \prod S

    with ``M`` ``(K, C)`` (``W^T`` for ``nn.Linear``) the matrix ``mm``/``addmm`` saved
    (``alpha = 1``): a gather of ``M``'s columns ``c_n``, divided by ``Z`` and broadcast, bit for
    bit what the ``mm``, ``view`` and ``mean`` backward formulas give for a one-hot seed (the
    sparse seeds' caveat aside: a NaN or Inf in another class's column, see :func:`_sparse_seeded`).
    Why: torch's ``mean`` backward divides a broadcast view into a tensor of a mixed layout, and
    the elementwise backward below it (ReLU6's) then runs slow loops, ~0.2 ms on EfficientNet-Lite0's
    ``(1, 1280, 7, 7)``, as much again at 10 targets per target. The seeds here are written out
    contiguous (channels last when ``leaf`` is), except through selections only: there they are
    ``M[:, c] / Z`` ``(T, N, K, 1, ...)`` expanded over the positions, never written (a selection
    reads one value per channel and takes the layout of what it saved, ``X``'s). Not for other
    backward formulas: SiLU's takes another vectorised loop for a broadcast gradient, whose
    rounding differs (float32, near a zero of its derivative, by 15 ulp), and a custom
    ``autograd.Function`` may write into the gradient it is handed (a whole channel, expanded).
    (Even written out, SiLU's vectorised loop may differ from the dense path's scalar one in the
    last bit.)
    """
    found = _linear_of_mean(scores, leaf)
    if found is None:
        return None
    edge, sizes, matrix = found
    m = matrix.detach()
    if targets.size == 1:  # one column: a view, no gather
        rows = m.select(1, int(targets.flat[0]))
    else:  # M's columns c, target t of example n at t N + n
        rows = m.t().index_select(0, torch.from_numpy(np.ascontiguousarray(targets.T).reshape(-1)).to(m.device))
    t = 1 if targets.ndim == 1 else targets.shape[1]
    spread = (rows / math.prod(sizes[2:])).view(t, sizes[0], sizes[1], *([1] * (len(sizes) - 2))).expand(t, *sizes)
    selections = _selections_only(edge.node, leaf)
    if selections:
        return edge, spread, True
    if leaf.ndim == len(sizes) and not leaf.is_contiguous() and leaf.movedim(1, -1).is_contiguous():
        # channels last, like A (and so, most likely, X): (T, N, *S, K) written, then K moved
        return edge, spread.movedim(2, -1).contiguous().movedim(-1, 2), False
    return edge, spread.contiguous(), False


def _linear_of_mean(y: torch.Tensor, leaf: torch.Tensor) -> tuple[Any, tuple[int, ...], torch.Tensor] | None:
    """``(edge into the mean, X's sizes, M)`` when ``y = reshape(mean(X, dims >= 2)) @ M (+ b)``
    with ``M`` and ``b`` parameters (:func:`_is_parameter`), else None (:func:`_pooled_seeds`)."""
    node: Any = y.grad_fn  # (the generated nodes' _saved_* attributes are not in torch's stubs)
    if (node is None or node.name() not in _SPARSE_SEEDED or y.ndim != 2 or type(y) is not torch.Tensor
            or y.layout != torch.strided or not y.is_floating_point()):
        return None
    addmm = node.name() == "AddmmBackward0"
    if addmm and node._saved_alpha != 1:
        return None
    edges = node.next_functions  # addmm: (bias, mat1, mat2); mm: (mat1, mat2)
    below: Any = edges[1 if addmm else 0][0]
    if not all(_is_parameter(f, leaf) for f, _ in edges[2 if addmm else 1:] + edges[:1 if addmm else 0]):
        return None
    while below is not None and below.name() in _RESHAPES:
        below = below.next_functions[0][0]
    if below is not None and below.name() == "AsStridedBackward1" and _restrides_pooled(below):
        below = below.next_functions[0][0]
    if below is None or below.name() != "MeanBackward1":
        return None
    sizes = tuple(below._saved_self_sym_sizes)
    rank = len(sizes)
    dims = [(d - 2**64 if d >= 2**63 else d) % rank for d in below._saved_dim or ()]  # int64 read as uint64
    matrix = node._saved_mat2
    producer, index = below.next_functions[0]
    if (rank < 3 or sorted(dims) != list(range(2, rank))
            or sizes[:2] != (y.shape[0], matrix.shape[0]) or producer is None):
        return None
    return torch.autograd.graph.GradientEdge(producer, index), sizes, matrix


def _restrides_pooled(node: Any) -> bool:
    """Whether an ``as_strided`` node only relabels a fresh ``(N, K, 1, ..., 1)`` average (what
    adaptive average pooling of a channels-last tensor does): offset 0 (or the input's), unit
    spatial sizes, and the strides ``(K, 1)`` of N and K that the average's own output has, so
    its backward is a reshape."""
    size, stride = tuple(node._saved_size), tuple(node._saved_stride)
    return (len(size) >= 3 and node._saved_storage_offset in (None, 0) and all(v == 1 for v in size[2:])
            and stride[:2] == (size[1], 1) and node.next_functions[0][0] is not None
            and node.next_functions[0][0].name() == "MeanBackward1")


def _is_parameter(node: Any, leaf: torch.Tensor) -> bool:
    """Whether a backward node leads nowhere or to a leaf other than ``leaf`` (a parameter, perhaps
    transposed)."""
    if node is not None and node.name() == "TBackward0":
        node = node.next_functions[0][0]
    return node is None or (node.name() == "torch::autograd::AccumulateGrad" and node.variable is not leaf)


_HEAVY = frozenset({"AddmmBackward0", "MmBackward0", "BmmBackward0", "ConvolutionBackward0",
                    "MkldnnConvolutionBackward0", "CudnnConvolutionBackward0"})
"""Backward nodes whose cost grows with the layer's size times a weight's: below the scores' own
``mm``, any of them makes T single passes dearer than one batched pass."""


def _light_below(y: torch.Tensor, limit: int = 32) -> bool:
    """Whether the part of the graph under the scores' ``mm`` holds no matrix product or
    convolution (:data:`_HEAVY`) within ``limit`` nodes: a classifier head (pooling, a ReLU,
    dropout, a reshape) whose T sparse passes repeat only elementwise work, cheaper than the
    dense ``(T N, C) @ (C, K)`` product of one batched pass. A deeper part (convolutions after
    the layer: ResNet-18 at ``layer2``, 10 targets, 8% slower as single passes) keeps the
    batched pass."""
    if y.grad_fn is None:
        return False
    stack = [f for f, _ in y.grad_fn.next_functions if f is not None]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit or node.name() in _HEAVY:
            return False
        stack += [f for f, _ in node.next_functions if f is not None]
    return True


def _symbolic_shapes_imported() -> bool:
    """Whether ``torch.autograd.grad(..., grad_outputs=...)`` would import nothing more (see :func:`_grad`)."""
    return "torch.fx.experimental.symbolic_shapes" in sys.modules


def _warn_zero_gradients(
    gradients: torch.Tensor, rank: int, where: str, weights: torch.Tensor | None = None, stacklevel: int = 4
) -> None:
    """Warn about examples (and targets) whose gradients are zero everywhere.

    ``weights`` (Eq. 1, the spatial means of the gradients), when known, clear every example
    (and target) with a non-zero weight at the cost of one small reduction; the gradients are
    searched only when some row of weights is all zero.
    """
    if weights is not None and bool(weights.any() if weights.numel() == weights.shape[-1] else
                                    weights.any(dim=-1).all()):  # (one row: one reduction)
        return
    lead = int(gradients.ndim) - rank + 1  # 1 (N,) or 2 (N, T)
    # max and min per example (and target) both 0: reductions without a temporary of the
    # gradients' size and no reshaped copy (the (N, T, ...) gradients are not contiguous).
    dims = tuple(range(lead, int(gradients.ndim)))
    zero = (gradients.amax(dim=dims) == 0) & (gradients.amin(dim=dims) == 0)
    if bool(zero.any()):
        warn_zero_gradients(zero.cpu().numpy(), where, stacklevel)


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


_MODE_DEPENDENT = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
    nn.RReLU,
)
"""torch.nn modules whose result depends on the training flag even where their ``forward`` does not
name it (instance norm reads it in a helper). Other modules: see :func:`_depends_on_mode`."""


def _depends_on_mode(module: nn.Module) -> bool:
    """Whether ``module``'s own forward pass may behave differently in training mode.

    True for batch norm, dropout, RReLU and instance norm with running statistics, for a module
    under ``torch.nn.utils.spectral_norm`` (its forward pre-hook updates the power iteration's
    buffers in training mode), and for any module whose ``forward`` reads ``training``
    (``self.training``, ``F.dropout(x, p, self.training)``: the name is in its bytecode); False for
    stateless modules such as ``nn.Flatten`` or ``nn.ReLU`` and for containers (their children are
    checked themselves).
    """
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    if isinstance(module, _MODE_DEPENDENT):
        return True
    if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
        return True
    code = getattr(type(module).forward, "__code__", None)
    return code is None or "training" in code.co_names


_BUFFER_WRITERS = (ObserverBase, FakeQuantizeBase)
"""Modules that write their buffers on every forward pass, in eval mode too: ``torch.ao`` observers
(calibration statistics) and fake quantizers (their observer's scale and zero point)."""

_WRITES_BUFFERS: dict[type, bool] = {}
"""``issubclass(kind, _BUFFER_WRITERS)`` per module type (an ABC check costs a microsecond)."""


def _writes_buffers(module: nn.Module) -> bool:
    """Whether ``module`` writes its buffers in eval mode too (:data:`_BUFFER_WRITERS`)."""
    kind = type(module)
    writes = _WRITES_BUFFERS.get(kind)
    if writes is None:
        if len(_WRITES_BUFFERS) >= 1024:  # fx makes a class per GraphModule: bounded
            _WRITES_BUFFERS.clear()
        writes = _WRITES_BUFFERS[kind] = issubclass(kind, _BUFFER_WRITERS)
    return writes


def _warn_if_training(*models: nn.Module) -> bool:
    """Whether the call must keep the models' state (:func:`_kept_as_it_was`); warns when it is
    because a module whose result depends on its training flag is in training mode.

    True also, without a warning, for a model in eval mode with a module that writes its buffers
    in any mode (:func:`_writes_buffers`). A freshly built stateless module (``nn.Flatten()`` in
    the head of an eval-mode network, a new ``nn.Sequential`` slice) is in training mode too, but
    that changes nothing: no warning, nothing kept.
    """
    kept = [_kept_for(model) for model in models]
    if "training" in kept:
        warnings.warn(
            "the model is in training mode: dropout and batch-norm make Grad-CAM maps random and "
            "mix examples; call model.eval() first (explain restores the buffers and the random "
            "state it used, so the model is left as it was)",
            TrainingModeWarning,
            stacklevel=4,
        )
        return True
    return "writes" in kept


@contextlib.contextmanager
def _kept_as_it_was(models: tuple[nn.Module, ...], device: torch.device) -> Iterator[Callable[[], None]]:
    """Leave the models' buffers and torch's random state exactly as they were; yield ``rewind``.

    For a model in training mode, or with a module that writes its buffers in eval mode too (the
    caller skips it otherwise: nothing to do, nothing copied; :func:`_warn_if_training`): batch
    norm then updates its running statistics and ``num_batches_tracked`` on every forward pass,
    observers their ranges, and dropout draws from the global generator. The buffers are copied
    before and copied back (into the same tensors, resized back where a module resized one) after;
    a buffer the model replaced is put back. The generator of the inputs' device is forked, and
    ``rewind()`` sets it back to its state at the start, so that every forward pass of one call
    (Grad-CAM, guided) draws the same dropout masks and two calls give the same maps.
    """
    saved = [
        (module, name, buffer, buffer.clone())
        for model in models for module in model.modules()
        for name, buffer in module._buffers.items() if buffer is not None
    ]
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(cuda, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, d)

        try:
            yield rewind
        finally:
            with torch.no_grad():
                for module, name, buffer, copy in saved:
                    module._buffers[name] = buffer
                    if buffer.shape != copy.shape:  # e.g. a per-channel observer's first statistics
                        buffer.resize_(copy.shape)
                    buffer.copy_(copy)


def _check_has_data(inputs: torch.Tensor) -> None:
    """Refuse inputs without data (the meta device): Grad-CAM needs values, not only shapes."""
    if inputs.is_meta:
        raise ValueError(
            "inputs are on the meta device, which holds shapes but no values: explain needs real "
            "inputs on the model's device"
        )


def _meta_tensor_of(model: nn.Module) -> str | None:
    """The name of a parameter or buffer of ``model`` on the meta device (no data), if any."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            return name
    return None


def _grid(reshape: Any) -> tuple[int, ...]:
    """``reshape`` given as a grid: positive ints (a str, a float, a bool is refused by name)."""
    values = list(reshape) if isinstance(reshape, (Sequence, np.ndarray)) and not isinstance(reshape, str) else None
    if not values or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1 for v in values
    ):
        raise TypeError(
            "reshape must be a callable (N, T, D) -> (N, D, *grid) or the grid's sizes as positive ints, "
            f"e.g. (14, 14), got {reshape!r}"
        )
    return tuple(int(v) for v in values)


def _kept_for(model: nn.Module) -> str | None:
    """Why ``model``'s state must be kept: ``"training"`` when a module whose result depends on the
    flag is in training mode, else ``"writes"`` when a module writes its buffers in eval mode too
    (:func:`_writes_buffers`), else None.

    ``"training"`` is what ``any(m.training and _depends_on_mode(m) for m in model.modules())``
    says, without building every dotted name: a walk over ``_modules``, stopping at the first
    such module. Only modules with children are remembered (each is expanded once, so shared
    containers and cycles cost nothing more); a shared leaf may be looked at twice, which changes
    nothing. A tenth of a millisecond on EfficientNet-Lite0's 185 modules right after its forward
    pass; only modules with buffers are looked up for ``"writes"``.
    """
    stack: list[nn.Module | None] = [model]
    expanded: set[int] = set()
    writes = False
    while stack:
        module = stack.pop()
        if module is None:  # a child registered as None
            continue
        if module.training and _depends_on_mode(module):
            return "training"
        if not writes and module._buffers and _writes_buffers(module):
            writes = True
        children = module._modules
        if children and id(module) not in expanded:
            expanded.add(id(module))
            stack += children.values()
    return "writes" if writes else None


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
    return _grid_of(activations, reshape), _tokens_to_grid(gradients, _grid(reshape))


def _grid_of(
    activations: torch.Tensor, reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Token activations ``(N, T, D)`` as ``(N, D, *grid)``: ``reshape``'s grid checked against them."""
    if callable(reshape):
        return reshape(activations)
    grid = _grid(reshape)
    if activations.ndim != 3:
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
    return _tokens_to_grid(activations, grid)


def _tokens_to_grid(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(..., T, D)`` -> ``(..., D, *grid)``: drop the first ``T - prod(grid)`` tokens."""
    kept = x[..., x.shape[-2] - math.prod(grid):, :]
    return kept.reshape(*x.shape[:-2], *grid, x.shape[-1]).movedim(-1, -1 - len(grid))


def _grid_to_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`_tokens_to_grid` undone: ``(B, D, *grid)`` -> ``(B, T, D)``, the first ``T - prod(grid)``
    tokens taken from ``tokens`` ``(1, T, D)`` (e.g. the class token, which the grid leaves out)."""
    b, d = x.shape[:2]
    flat = x.movedim(1, -1).reshape(b, -1, d)
    return torch.cat([tokens[:, :tokens.shape[1] - flat.shape[1]].expand(b, -1, -1), flat], dim=1)


# --- re-scoring perturbed copies (Score-CAM, Ablation-CAM) ----------------------------------------


def perturb(
    model: nn.Module | tuple[nn.Module, nn.Module],
    inputs: torch.Tensor,
    make: Callable[..., torch.Tensor],
    *,
    layer: str | nn.Module | None = None,
    where: str = "activations",
    batch_size: int = 32,
    count: Callable[[torch.Tensor, int], int] | None = None,
    at: str = "output",
    call: int | None = None,
    memory_format: str = "channels_last",
    fold_batch_norms: bool = True,
    fuse_convolutions: bool = True,
    reshape: Sequence[int] | Callable[[torch.Tensor], torch.Tensor] | None = None,
    scored: Callable[[torch.Tensor], Any] | None = None,
) -> Perturbed:
    """Score perturbed copies of each example without autograd (the Protocol's ``perturb``).

    ``where="activations"`` runs only the part of the model after the layer: ``head`` in the
    split form; otherwise the part of the model's ``torch.fx`` graph that depends on the layer's
    output (its tail), when the model traces and that part needs nothing else computed before
    the layer. Else (untraceable models, skip connections around the layer) it falls back to
    the whole model on the example repeated, with a forward hook substituting the perturbed
    activations (the part before the layer then runs again for every batch).

    ``where="inputs"`` scores the copies under ``torch.inference_mode`` on a scoring copy of the
    model (``backends/torch/_scoring.py``; the user's model is not touched): eval-mode
    batch norms folded into the convolutions before them (``fold_batch_norms=True``) and, on a
    CPU with images ``(N, C, H, W)``, ``memory_format="channels_last"`` (oneDNN's fast layout).
    Both change the last bits of float32 scores, as the batch size does; a copy whose scores on
    the unmasked inputs differ from the model's by more than ``sqrt(eps)`` of their largest
    magnitude is dropped for the unfolded one. In ``channels_last`` on a CPU,
    ``fuse_convolutions=True`` also runs the copy's float32 ``nn.Conv2d`` through oneDNN with their
    weights packed once and the ReLU and residual addition after them fused
    (:func:`_scoring.fuse`; models that ``torch.fx`` traces), checked the same way; a copy that
    fails the check, or whose fused pass raises on some batch, is dropped for the unfused one.
    ``memory_format="preserve"`` with ``fold_batch_norms=False`` runs the model as it is.

    ``reshape`` (token layers, as in :func:`capture`): A is perturbed in its ``(N, D, *grid)``
    form; for ``where="activations"`` the perturbed grid goes back to tokens (the tokens the grid
    leaves out, e.g. the class token, as they were), so ``reshape`` must be the grid's sizes.
    """
    if reshape is not None and not callable(reshape):
        reshape = _grid(reshape)
    if callable(reshape) and where == "activations":
        raise ValueError(
            "reshape must be the grid's sizes, e.g. (14, 14), not a callable, for a method that "
            "perturbs the layer's activations (ablation-cam): they go back to tokens, and a callable "
            "cannot be undone"
        )
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, ...), got {type(inputs).__name__}")
    check_where(where)
    if memory_format not in ("channels_last", "preserve"):
        raise ValueError(f"memory_format must be 'channels_last' or 'preserve', got {memory_format!r}")
    if not isinstance(fold_batch_norms, bool):
        raise TypeError(f"fold_batch_norms must be a bool, got {type(fold_batch_norms).__name__}")
    if not isinstance(fuse_convolutions, bool):
        raise TypeError(f"fuse_convolutions must be a bool, got {type(fuse_convolutions).__name__}")
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, got {at!r}")
    module: nn.Module | None = None
    if isinstance(model, (tuple, list)):
        parts: tuple[nn.Module, ...] = _split_form(model, layer, at, call)
    else:
        module, name = _resolve_layer(model, layer)
        parts = (model,)
    # In training mode the passes update batch norms' buffers and draw dropout masks: both set back.
    training = _warn_if_training(*parts)
    with _kept_as_it_was(parts, inputs.device) if training else contextlib.nullcontext(_nothing) as rewind:
        with torch.no_grad():
            if isinstance(model, (tuple, list)):
                features, head = parts  # type: ignore[misc]
                a = _run(features, inputs.clone())  # a copy: features may write into its input
                scores = _run(head, a)
                whole: Callable[[torch.Tensor], Any] = lambda v: head(features(v))  # noqa: E731
                tail: Callable[[torch.Tensor], Any] | None = head
                name = "features"
            else:
                assert module is not None  # resolved above for the single-module form
                # Each pass runs on its own copy of the inputs: a model that writes into its input
                # leaves them as they are. A negative call counts from the end: the hook counts from 0.
                a, scores, call = _forward_taken(model, module, name, at, call, inputs, rewind)
                if at == "input" and where == "activations":
                    _check_read_by_layer_only(model, module, name, call, inputs)
                whole = model
                tail = _tail(model, name) if where == "activations" and at == "output" and call is None else None
            _check_captured(a, scores, inputs, f"the {at} of layer {name!r}")
            tokens = a
            if reshape is not None:
                a = _grid_of(a, reshape)
            check_feature_maps("activations", a)
            rows = torch.full((*a.shape[:2], *scores.shape[1:]), torch.nan, dtype=scores.dtype, device=scores.device)
            layout = torch.channels_last if (where == "inputs" and memory_format == "channels_last"
                                             and inputs.ndim == 4 and inputs.device.type == "cpu") else None
            if scored is not None:
                scored(scores)
            if where == "inputs":
                whole = _scoring_model(model, layout, fold_batch_norms, whole, inputs, scores,
                                       fuse=fuse_convolutions and layout is not None)
        with torch.inference_mode():
            for i, _, spans in perturb_chunks(a, batch_size, count):
                for start, stop in spans:
                    batch = make(inputs, a, i, start, stop)
                    if reshape is not None and where == "activations":
                        batch = _grid_to_tokens(batch, tokens[i:i + 1])
                    if where == "inputs":
                        out = _run(whole, batch)  # type: ignore[arg-type]
                    elif tail is not None:
                        out = tail(batch)
                    else:
                        # a copy: a model that changes its input in place must not write into the user's
                        repeated = inputs[i:i + 1].expand(stop - start, *inputs.shape[1:]).clone()
                        out = _substituted(model, module, at, call, repeated, batch)  # type: ignore[arg-type]
                    rows[i, start:stop] = out
        return Perturbed(a, scores, rows)


def _scoring_model(model: nn.Module | tuple[nn.Module, nn.Module], layout: torch.memory_format | None,
                   fold_batch_norms: bool, whole: Callable[[torch.Tensor], Any], inputs: torch.Tensor,
                   scores: torch.Tensor, *, fuse: bool = False) -> Callable[[torch.Tensor], Any]:
    """The scoring copy of ``model`` (:func:`_scoring.scoring_copy`), or ``whole`` (the model as it is).

    A copy with folded batch norms or fused convolutions (``fuse``: :func:`_scoring.fuse`) is
    checked once on ``inputs`` against the model's ``scores``: more than ``sqrt(eps)`` of their
    largest magnitude apart (a convolution subclass whose ``forward`` ignores its bias, say), the
    unfused, then the unfolded copy is used instead. The fused copy's pass falls back to the
    unfused copy for good the first time it raises (an op missing, a batch size oneDNN refuses).
    """
    parts = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    made = _scoring.scoring_copy(parts, layout=layout, fold_batch_norms=fold_batch_norms)
    if made is None:
        return whole
    copies, folded = made
    fused = tuple(_scoring.fuse(c) for c in copies) if fuse else ()
    is_fused = any(f is not None for f in fused)

    def through(chain: tuple[Any, ...], v: torch.Tensor) -> Any:
        v = v if layout is None else v.contiguous(memory_format=layout)
        for part in chain:
            v = _run(part, v)
        return v

    run: Callable[[torch.Tensor], Any] = lambda v: through(copies, v)  # noqa: E731
    if is_fused:
        fast = tuple(c if f is None else f for f, c in zip(fused, copies, strict=True))
        broken: list[Exception] = []

        def run(v: torch.Tensor) -> Any:
            if not broken:
                try:
                    out = through(fast, v)
                    if not (isinstance(out, torch.Tensor) and out.shape[1:] == scores.shape[1:]
                            and out.shape[0] == v.shape[0]):
                        got = shape_of(out) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise ValueError(f"the fused pass returned {got} for a batch of {v.shape[0]}")
                    return out
                except Exception as error:  # noqa: BLE001 - private oneDNN ops: any failure, the eager copy
                    broken.append(error)
                    _scoring._LOG.debug("scoring copy: the fused pass raised %r; unfused from now on", error)
            return through(copies, v)

    if folded or is_fused:
        checked = run(inputs.clone())  # a copy: the model may write into its input
        tolerance = math.sqrt(torch.finfo(scores.dtype).eps) * float(scores.abs().max())
        if not (isinstance(checked, torch.Tensor) and checked.shape == scores.shape
                and float((checked - scores).abs().max()) <= tolerance):
            if is_fused:
                _scoring._LOG.debug("scoring copy: fusing the convolutions changed the scores; not fused")
                return _scoring_model(model, layout, fold_batch_norms, whole, inputs, scores, fuse=False)
            _scoring._LOG.debug("scoring copy: folding %d batch norms changed the scores; not folded", folded)
            return _scoring_model(model, layout, False, whole, inputs, scores)
    return run


def _forward_taken(
    model: nn.Module, module: nn.Module, name: str, at: str, call: int | None, inputs: torch.Tensor,
    rewind: Callable[[], None] = _nothing,
) -> tuple[torch.Tensor, Any, int | None]:
    """One no-grad forward pass: the layer's ``at`` at call ``call`` (detached), the scores, and
    the call counted from 0 (None stays None)."""
    taken: list[torch.Tensor] = []

    def keep(value: Any) -> None:  # a copy now: an in-place op after the layer would change it
        taken.append(value.detach().clone() if isinstance(value, torch.Tensor) else value)

    def once() -> Any:
        taken.clear()
        if at == "output":
            handle = module.register_forward_hook(lambda m, args, out: keep(out))
        else:
            handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
        try:
            return _run(model, inputs.clone())  # a copy: the model may write into its input
        finally:
            handle.remove()

    scores = _hooks_seen(model, name, once, lambda _: bool(taken), rewind)
    if call is None and len(taken) > 1:
        raise ValueError(f"layer {name!r} ran {len(taken)} times in one forward pass: pass call=i to pick one")
    if call is not None and not -len(taken) <= call < len(taken):
        raise ValueError(f"call={call} but layer {name!r} ran {len(taken)} time(s) in the forward pass")
    value = taken[0 if call is None else call]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"the {at} of layer {name!r} must be one floating-point tensor (N, K, *spatial)")
    return value, scores, None if call is None else call % len(taken)


def _check_read_by_layer_only(model: nn.Module, module: nn.Module, name: str, call: int | None,
                              inputs: torch.Tensor) -> None:
    """Refuse to perturb a layer's input that other modules read too (a skip connection around it).

    Substituting the perturbed A at the layer's input would leave the other readers the original
    A: not the perturbation of A. One pass with grad from inputs that require grad (or, for
    integer inputs, through the weights, as :func:`_forward_hooked` does) shows every reader: the
    score's graph reaches A other than through the copy the layer was handed.
    """
    taken: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # per call: (A, the layer's copy)

    def keep(m: nn.Module, args: tuple[Any, ...]) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            taken.append(None)
            return None
        given = args[0].clone()
        taken.append((args[0], given))
        return (given, *args[1:])

    with contextlib.ExitStack() as undo:
        inputs = _in_the_graph(model, inputs, undo)
        handle = module.register_forward_pre_hook(keep)
        undo.callback(handle.remove)
        with torch.enable_grad():
            scores = _run(model, inputs)
        chosen = taken[0 if call is None else call] if taken else None
        if chosen is None or not isinstance(scores, torch.Tensor) or scores.grad_fn is None:
            return  # A without history: its other readers, if any, cannot be seen
        a, given = chosen
        # A is the edge (its node, its output number): a sibling output of the same node (the
        # other half of a chunk or split) is another tensor. Leaf A: its AccumulateGrad node.
        edge = (a.grad_fn, a.output_nr)
        seen: set[Any] = set()
        stack: list[Any] = [scores.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen or node is given.grad_fn or node is a.grad_fn:
                continue
            seen.add(node)
            for next_node, number in node.next_functions:
                if (next_node is not None and next_node is edge[0] and number == edge[1]) or \
                        (a.grad_fn is None and getattr(next_node, "variable", None) is a):
                    raise ValueError(
                        f"the input of layer {name!r} is also read by other modules (a skip connection "
                        "around the layer), so replacing it at the layer does not perturb that tensor; "
                        "take the output of the module that computes it (at='output'), or use "
                        "at='input' with a gradient method"
                    )
                stack.append(next_node)


def _substituted(model: nn.Module, module: nn.Module, at: str, call: int | None, inputs: torch.Tensor,
                 replacement: torch.Tensor) -> Any:
    """``model(inputs)`` with the layer's ``at`` (at call ``call``) replaced by ``replacement``."""
    calls = [0]
    index = 0 if call is None else call

    def swap(value: Any) -> Any:
        this = calls[0]
        calls[0] += 1
        return replacement if this == index else value

    if at == "output":
        handle = module.register_forward_hook(lambda m, args, out: swap(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (swap(args[0]), *args[1:]))
    try:
        return _run(model, inputs)
    finally:
        handle.remove()


def _tail(model: nn.Module, name: str) -> Callable[[torch.Tensor], Any] | None:
    """The part of ``model`` after submodule ``name``, as a ``torch.fx.GraphModule`` of its output.

    None when the model does not trace, the layer is called more than once, or the part after
    it reads a value computed before it (e.g. a skip connection around the layer). Traced on
    every call (:func:`_scoring.traced`: the model is left as it was): a trace bakes in the
    Python values the forward code read (``self.temperature``, a flag, the buffer objects), so a
    tail kept from an earlier call would score the model as it was then. A trace costs 20-50 ms
    (ResNet-18, MobileNetV3 on a CPU), a fraction of the ablation passes.
    """
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return qualified_name == name or super().is_leaf_module(m, qualified_name)

    try:
        graph = _scoring.traced(_Tracer(), model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace: use the hooked fallback
        return None
    nodes = list(graph.nodes)
    seams = [node for node in nodes if node.op == "call_module" and node.target == name]
    return _graph_after(model, nodes, seams[0]) if len(seams) == 1 else None


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
