"""Perturbed copies re-scored without autograd: the Protocol's ``perturb`` (Score-CAM, Ablation-CAM).

:func:`perturb` takes A in one no-grad pass, then scores each batch of copies that ``make``
builds: perturbed activations through the part of the model after the layer (its ``torch.fx``
tail, or the whole model with a hook substituting them), perturbed inputs through the scoring
copy of ``_scoring.py`` (batch norms folded, convolutions fused, checked once against the
model's scores).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradcam_ref.backends._contract import (
    Perturbed,
    check_feature_maps,
    check_where,
    perturb_chunks,
    shape_of,
)
from gradcam_ref.backends.torch import _forward, _scoring, _state, _tokens


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
        reshape = _tokens.grid_sizes(reshape)
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
    if at not in _forward.AT:
        raise ValueError(f"at must be one of {_forward.AT}, got {at!r}")
    module: nn.Module | None = None
    if isinstance(model, (tuple, list)):
        parts: tuple[nn.Module, ...] = _forward.split_form(model, layer, at, call)
    else:
        module, name = _forward.resolve_layer(model, layer)
        parts = (model,)
    # In training mode the passes update batch norms' buffers and draw dropout masks: both set back.
    training = _state.warn_if_training(*parts)
    with _state.kept_as_it_was(parts, inputs.device) if training else contextlib.nullcontext(_state.nothing) as rewind:
        with torch.no_grad():
            if isinstance(model, (tuple, list)):
                features, head = parts  # type: ignore[misc]
                a = _forward.run(features, inputs.clone())  # a copy: features may write into its input
                scores = _forward.run(head, a)
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
            _forward.check_captured(a, scores, inputs, f"the {at} of layer {name!r}")
            tokens = a
            if reshape is not None:
                a = _tokens.grid_of(a, reshape)
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
                        batch = _tokens.grid_to_tokens(batch, tokens[i:i + 1])
                    if where == "inputs":
                        out = _forward.run(whole, batch)  # type: ignore[arg-type]
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
            v = _forward.run(part, v)
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
    rewind: Callable[[], None] = _state.nothing,
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
            return _forward.run(model, inputs.clone())  # a copy: the model may write into its input
        finally:
            handle.remove()

    scores = _forward.hooks_seen(model, name, once, lambda _: bool(taken), rewind)
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
    integer inputs, through the weights, as :func:`_forward.hooked` does) shows every reader: the
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
        inputs = _forward.in_the_graph(model, inputs, undo)
        handle = module.register_forward_pre_hook(keep)
        undo.callback(handle.remove)
        with torch.enable_grad():
            scores = _forward.run(model, inputs)
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
        return _forward.run(model, inputs)
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

