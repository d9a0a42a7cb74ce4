r"""The scoring copy: the model that Score-CAM's masked inputs run on, cheaper per forward pass.

Score-CAM runs the whole model once per distinct channel (hundreds of passes). They run on a copy
(the user's model is never touched) in which

- each eval-mode batch norm that reads a convolution's output, and nothing else reads that
  output, is folded into the convolution (:func:`fold_weights`; the norm becomes ``nn.Identity``).
  The pairs are found on the model's ``torch.fx`` graph (convolutions, their subclasses too, and
  batch norms are leaves) but the copy keeps the model's own ``forward``: only two modules
  change per pair. Pairs with hooks, parametrised weights, shared modules or attribute reads are
  left alone; a model that does not trace is copied unfolded (a debug log line, nothing else);
- on the CPU, images ``(N, C, H, W)`` run in ``channels_last`` (oneDNN's native layout), and
  :func:`fuse` rewrites the copy's ``torch.fx`` graph so that each float32 ``nn.Conv2d`` is a
  :class:`PackedConv2d` (weights reordered for oneDNN once, the ReLU and residual addition
  after it in the same call); a model that does not trace keeps the eager copy.

Both change the last bits of float32 scores, as the batch size does; :func:`scoring_copy`'s
caller checks the copy's scores against the model's on the unmasked inputs once, and falls
back to the eager copy when a fused pass raises.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

_LOG = logging.getLogger(__name__)

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions a batch norm is folded into (not the transposed ones: their weight is ``(in, out, ...)``)."""


def fold_weights(conv: _ConvNd, norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The weight and bias of ``conv`` followed by the eval-mode batch norm ``norm``, as one convolution.

    .. math::

        W'_o = W_o \, s_o, \qquad b'_o = (b_o - \mu_o) \, s_o + \beta_o, \qquad
        s_o = \frac{\gamma_o}{\sqrt{\sigma^2_o + \epsilon}}

    for each output channel :math:`o` (Ioffe & Szegedy 2015, Eq. in Alg. 2), with :math:`W_o` the
    ``(in / groups, *kernel)`` filter of channel :math:`o` (any ``groups``, depthwise too),
    :math:`b_o = 0` without a bias, :math:`\gamma = 1, \beta = 0` without affine parameters,
    :math:`\mu, \sigma^2` the running statistics. Computed in float64, rounded once to the
    convolution's dtype.

    Args:
      conv: an ``nn.Conv1d/2d/3d`` (or subclass), weight ``(out, in / groups, *kernel)``.
      norm: a batch norm over ``out`` features with running statistics.

    Returns:
      ``(weight, bias)``, detached tensors of ``conv.weight``'s dtype and device.
    """
    weight = conv.weight.detach()
    w = weight.double()
    assert norm.running_mean is not None and norm.running_var is not None  # foldable_pairs checked it
    mean, var = norm.running_mean.detach().double(), norm.running_var.detach().double()
    gamma = torch.ones_like(mean) if norm.weight is None else norm.weight.detach().double()
    beta = torch.zeros_like(mean) if norm.bias is None else norm.bias.detach().double()
    b = torch.zeros_like(mean) if conv.bias is None else conv.bias.detach().double()
    scale = gamma * torch.rsqrt(var + norm.eps)
    folded_w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    folded_b = (b - mean) * scale + beta
    return folded_w.to(weight.dtype), folded_b.to(weight.dtype)


def traced(tracer: Any, model: nn.Module) -> Any:
    """``tracer.trace(model)`` (a ``torch.fx.Graph``), the model left as it was.

    Tracing runs the forward code of every module that is not a leaf on fx Proxies: what it
    assigns to the module (``self.last = x``, ``self.calls += 1``) would stay there, a Proxy that
    ``torch.save`` cannot pickle or a changed counter. Each module's attributes (``__dict__``) and
    its registered parameters, buffers and submodules are put back as they were, also when the
    trace raises. Not undone: changes inside objects the modules hold (``self.seen.append(x)``)
    and outside the model (a hook writing into a dict of the caller's).
    """
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (a dict of the model, its entries)
    for m in model.modules():
        registries: tuple[dict[str, Any], ...] = (m.__dict__, m._parameters, m._buffers, m._modules)
        saved += [(registry, dict(registry)) for registry in registries]
    try:
        return tracer.trace(model)
    finally:
        for registry, entries in saved:
            registry.clear()
            registry.update(entries)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(convolution, batch norm)`` qualified names that :func:`fold` may fold in ``model``.

    Empty when the model does not trace with ``torch.fx`` (traced by :func:`traced`: the model
    is left as it was).
    """
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, (*CONVOLUTIONS, _BatchNorm)) or super().is_leaf_module(m, qualified_name)

    try:
        graph = traced(_Tracer(), model)
    except Exception as error:  # noqa: BLE001 - any model fx cannot trace: no folding, nothing else changes
        _LOG.debug("scoring copy: %s does not trace with torch.fx (%s): batch norms not folded",
                   type(model).__name__, error)
        return []
    calls: dict[str, int] = {}
    read: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        conv, norm = model.get_submodule(node.target), model.get_submodule(user.target)
        names = (node.target, user.target)
        if (_foldable(conv, norm) and all(calls[n] == 1 for n in names)
                and not any(r == n or r.startswith(n + ".") for r in read for n in names)):
            pairs.append(names)
    return pairs


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, CONVOLUTIONS) and isinstance(norm, _BatchNorm)
            and type(norm).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
            and not norm.training and norm.running_mean is not None and norm.running_var is not None
            and conv.weight.is_floating_point() and conv.weight.shape[0] == norm.num_features
            and not parametrize.is_parametrized(conv)
            and not any(_hooked(m) for m in (conv, norm)))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def fold(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """``model`` itself (a copy, never the user's) with each pair folded: the conv gets
    :func:`fold_weights`, the batch norm becomes ``nn.Identity``."""
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        assert isinstance(conv, _ConvNd) and isinstance(norm, _BatchNorm)  # foldable_pairs checked it
        weight, bias = fold_weights(conv, norm)
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        parent, _, name = norm_name.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.Identity())
    return model


def scoring_copy(parts: tuple[nn.Module, ...], *, layout: torch.memory_format | None,
                 fold_batch_norms: bool) -> tuple[tuple[nn.Module, ...], int] | None:
    """Copies of ``parts`` (the model, or both halves of the split form) with the batch norms folded
    and the parameters in ``layout``, and how many norms were folded.

    None when there is nothing to change, or the model cannot be copied.
    """
    pairs = [foldable_pairs(p) if fold_batch_norms else [] for p in parts]
    if layout is None and not any(pairs):
        return None
    try:
        copies = copy.deepcopy(parts)
    except (TypeError, RuntimeError, copy.Error):  # e.g. tensors that are not graph leaves
        return None
    copies = tuple(fold(c, p) for c, p in zip(copies, pairs, strict=True))
    if layout is not None:
        copies = tuple(c.to(memory_format=layout) for c in copies)
    return copies, sum(len(p) for p in pairs)


# --- oneDNN: weights packed once, ReLU and residual additions fused (CPU, float32) ---------------

_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class PackedConv2d(nn.Module):
    r"""A 2-D convolution run by oneDNN with its weight reordered once into oneDNN's blocked layout.

    .. math::

        Y = \mathrm{act}\big(\mathrm{conv}(X; W) + b \;[+\, R]\big)

    with :math:`\mathrm{act}` the identity or ReLU and :math:`R` (``other``, same shape as the
    output) the optional residual, all in one oneDNN call (``torch.ops.mkldnn``, the ops that
    ``torch.compile``'s CPU backend emits). ``in_place=True`` writes :math:`Y` into ``other``
    (:func:`fuse` passes it only for a tensor nothing reads afterwards). Eager ``nn.Conv2d``
    reorders the weight on every call; here it is done at construction.

    Args:
      conv: an ``nn.Conv2d`` (float32, integer padding, ``padding_mode="zeros"``).
      relu: apply ReLU after the (sum and) bias.
      residual: ``forward`` takes ``other``, :math:`R`.
      in_place: write the result into ``other``.
    """

    def __init__(self, conv: nn.Conv2d, *, relu: bool, residual: bool, in_place: bool) -> None:
        super().__init__()
        self.geometry = ([int(p) for p in conv.padding], [int(s) for s in conv.stride],  # type: ignore[union-attr]
                         [int(d) for d in conv.dilation], int(conv.groups))
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), *self.geometry, None)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.kernel = tuple(int(k) for k in conv.kernel_size)
        self.out_channels = int(conv.out_channels)
        self.relu, self.residual, self.in_place = relu, residual, in_place

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        ops = torch.ops.mkldnn
        if other is not None and (other.dtype != torch.float32 or other.shape != self.output_shape(x)):
            raise ValueError(f"PackedConv2d: the residual must be float32 of the output's shape "
                             f"{tuple(self.output_shape(x))}, got {other.dtype} {tuple(other.shape)}")
        if other is None:
            return ops._convolution_pointwise(x, self.packed, self.bias, *self.geometry,
                                              "relu" if self.relu else "none", [], "")
        if self.in_place:  # oneDNN's sum post-op: accumulates into other
            return ops._convolution_pointwise_.binary(other, x, self.packed, self.bias, *self.geometry,
                                                      "add", 1.0, "relu" if self.relu else None, [], "")
        y = ops._convolution_pointwise.binary(x, other, self.packed, self.bias, *self.geometry,
                                              "add", 1.0, None, [], "")
        return y.relu_() if self.relu else y

    def output_shape(self, x: torch.Tensor) -> torch.Size:
        """``(N, out, H', W')`` with ``H' = (H + 2 p - d (k - 1) - 1) // s + 1``, the same for ``W'``."""
        padding, stride, dilation, _ = self.geometry
        spatial = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                   for size, p, s, d, k in zip(x.shape[2:], padding, stride, dilation, self.kernel, strict=True))
        return torch.Size((x.shape[0], self.out_channels, *spatial))


def packable(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D convolution :class:`PackedConv2d` computes exactly as ``module(x)``."""
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32)
            and not parametrize.is_parametrized(module) and not _hooked(module))


def fuse(model: nn.Module) -> nn.Module | None:
    """``model`` (a scoring copy, never the user's) as a ``torch.fx.GraphModule`` whose 2-D
    convolutions are :class:`PackedConv2d`, each with the ReLU and the addition after it folded in.

    Patterns, on the graph with the folded batch norms (``nn.Identity``) removed: a convolution
    read only by a ReLU (module, function or method); read only by an addition of one other
    tensor (``+``, ``+=``, ``torch.add`` without ``alpha``), itself read only by a ReLU or not.
    The addition writes into the other tensor when that is a new tensor (a convolution's or a max
    pooling's output) that nothing reads afterwards, and not the convolution's input (ResNet's
    identity and downsample branches). A convolution is fused only when nothing between it and its
    addition or ReLU may write in place (:func:`_may_write`): fused, it runs there, and would read
    what such a write left in its input. Hooked modules are left alone. None when the model does
    not trace with ``torch.fx``, has no packable convolution, or oneDNN is not available.
    """
    import torch.fx

    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")):
        return None
    if any(_hooked(m) for m in model.modules()):
        return None  # a hook on a container sees its module's inputs and outputs; keep the model's forward
    if not any(packable(m) for m in model.modules()):
        return None
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any model fx cannot trace: not fused
        _LOG.debug("scoring copy: %s does not trace with torch.fx (%s): not fused", type(model).__name__, error)
        return None
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    packed: dict[Any, PackedConv2d] = {}  # the new nodes
    for node in list(graph.nodes):
        if node.op != "call_module" or not packable(modules[node.target]):
            continue
        user = _only_user(node)
        chain, other, relu = [node], None, False  # the nodes the packed convolution replaces
        if user is not None and _is_relu(user, modules):
            chain, relu = [node, user], True
        elif user is not None and _is_add(user, node):
            other = user.args[1] if user.args[0] is node else user.args[0]
            chain = [node, user]
            after = _only_user(user)
            if after is not None and _is_relu(after, modules):
                chain, relu = [node, user, after], True
        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(_may_write(n, modules) for n in order if order[node] < order[n] < order[chain[-1]]):
            chain, other, relu = [node], None, False  # the convolution moved past a write could read another input
        last = chain[-1]
        in_place = other is not None and _writable(other, node.args[0], user, packed, modules, order)
        name = f"packed_{len(packed)}_" + node.target.replace(".", "_")
        module = PackedConv2d(modules[node.target], relu=relu, residual=other is not None, in_place=in_place)
        graph_module.add_module(name, module)
        with graph.inserting_after(last):
            new = graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        last.replace_all_uses_with(new)
        for dead in reversed(chain):
            graph.erase_node(dead)
        packed[new] = module
    if not packed:
        return None
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _root(node: Any, packed: dict[Any, PackedConv2d], modules: dict[str, nn.Module]) -> Any:
    """The node whose new tensor ``node``'s value is (itself, or what an in-place packed convolution
    wrote into), or None when unknown (a view, an in-place op, an input).

    New tensors: the outputs of packed convolutions, of convolutions and of max poolings."""
    while node in packed and packed[node].in_place:
        node = node.args[1]
    if node in packed:
        return node
    module = modules.get(node.target) if node.op == "call_module" else None
    fresh = module is not None and (packable(module) or (type(module) is nn.MaxPool2d and not module.return_indices
                                                         and not _hooked(module)))
    return node if fresh else None


def _writable(other: Any, x: Any, add: Any, packed: dict[Any, PackedConv2d], modules: dict[str, nn.Module],
              order: dict[Any, int]) -> bool:
    """Whether the convolution of ``x`` added to ``other`` at node ``add`` may write into ``other``:
    ``other`` is a new tensor, not ``x``'s, and no node after ``add`` reads it (or an alias of it)."""
    root = _root(other, packed, modules)
    if root is None or _root(x, packed, modules) in (None, root):
        return False
    family = [n for n in order if _root(n, packed, modules) is root]
    return all(order[u] < order[add] for n in family for u in n.users if u is not add)


def _may_write(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into a tensor in place: an ``inplace=True`` module, a function or
    method whose name ends in ``_`` (``relu_``, ``add_``), an augmented assignment (``+=``),
    ``setitem`` (:data:`_IN_PLACE`) or an ``inplace=True`` keyword."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return ((name.endswith("_") and not name.endswith("__")) or bool(node.kwargs.get("inplace"))
            or (node.op == "call_function" and node.target in _IN_PLACE))


_IN_PLACE = frozenset(getattr(operator, n) for n in (
    "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior", "ipow", "irshift", "isub",
    "itruediv", "ixor", "setitem"))
"""``operator``'s augmented assignments and ``setitem`` (``a += b``, ``a[i] = b``): they write into ``a``."""


def _only_user(node: Any) -> Any:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU and not _hooked(modules[node.target])
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs


def _is_add(node: Any, conv: Any) -> bool:
    import torch.fx

    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS and len(node.args) == 2
            and not node.kwargs and conv in node.args and node.args[0] is not node.args[1]
            and isinstance(node.args[1] if node.args[0] is conv else node.args[0], torch.fx.Node))
