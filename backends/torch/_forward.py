r"""The torch backend's forward pass: A taken at the layer by a hook, the graph started there.

:func:`hooked` runs the model once with a forward hook (a pre-hook for ``at="input"``) on the
layer: :class:`_Probe` makes the layer's output a leaf that requires grad, turns grad mode on for
the rest of the pass and hands the model a copy, so that in-place ops downstream leave A alone.
:func:`split` does the same for the split form ``(features, head)``. Also here: the layer found
by name (:func:`resolve_layer`), the model run with a note on its errors (:func:`run`), and the
checks of what the pass returned. The full account: docs/backends.md.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradcam_ref.backends._contract import (
    ProbabilityScoresWarning,
    check_same_batch,
    probabilities_message,
    shape_of,
)
from gradcam_ref.backends.torch import _state

AT = ("output", "input")
"""Where A may be taken: the layer's output (a forward hook) or its input (a pre-hook)."""


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
        start (:func:`hooked`), so A is in the graph when it depends on the inputs or
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


def hooked(
    model: nn.Module, module: nn.Module, name: str, at: str, index: int | None, inputs: torch.Tensor,
    attached: bool = False, undo: contextlib.ExitStack | None = None, rewind: Callable[[], None] = _state.nothing,
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
            copy = in_the_graph(model, inputs, undo)
        else:
            copy = inputs.clone()  # a model that writes into its input in place leaves the caller's alone
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(attached or at == "input")  # inference: no graph before the layer
            return probe, run(model, copy)
        finally:
            torch.set_grad_enabled(grad_mode)
            handle.remove()

    probe, scores = hooks_seen(model, name, once, lambda result: result[0].calls > 0, rewind)
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


def in_the_graph(model: nn.Module, inputs: torch.Tensor, undo: contextlib.ExitStack) -> torch.Tensor:
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


def count_calls(model: nn.Module, module: nn.Module, name: str, at: str, inputs: torch.Tensor) -> int:
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
                run(model, inputs.clone())  # a copy: the model may write into its input
        finally:
            handle.remove()
        return calls[0]

    return int(hooks_seen(model, name, once, lambda calls: calls > 0))


def hooks_seen(model: nn.Module, name: str, run: Callable[[], Any], ran: Callable[[Any], bool],
                rewind: Callable[[], None] = _state.nothing) -> Any:
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


def split(
    features: nn.Module, head: nn.Module, inputs: torch.Tensor, attached: bool = False
) -> tuple[torch.Tensor, Any]:
    with torch.set_grad_enabled(attached):
        a = run(features, inputs.clone())  # a copy: features may write into its input
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        kind = f"a {a.dtype} tensor" if isinstance(a, torch.Tensor) else type(a).__name__
        raise TypeError(f"features(inputs) must be one floating-point tensor (N, K, *spatial), got {kind}")
    leaf = a if attached and a.requires_grad else a.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = run(head, leaf.clone())
    return leaf, scores


def run(model: nn.Module, inputs: torch.Tensor) -> Any:
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


def warn_if_probabilities(scores: torch.Tensor, model: Any) -> None:
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


def check_captured(leaf: torch.Tensor, scores: Any, inputs: torch.Tensor, where: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"the model must return one tensor of scores, got {type(scores).__name__}; "
            "wrap it in a module that returns the tensor to explain"
        )
    check_same_batch(leaf, scores, inputs, where, "(N, K, *spatial)")


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[nn.Module, str]:
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


def split_form(
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


def check_has_data(inputs: torch.Tensor) -> None:
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

