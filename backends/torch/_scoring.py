r"""The scoring copy: the model that Score-CAM's masked inputs run on, cheaper per forward pass.

Score-CAM runs the whole model once per distinct channel (hundreds of passes). They run on a copy
(the user's model is never touched) in which

- each eval-mode batch norm that reads a convolution's output, and nothing else reads that
  output, is folded into the convolution (:func:`fold_weights`; the norm becomes ``nn.Identity``).
  The pairs are found on the model's ``torch.fx`` graph (convolutions, their subclasses too, and
  batch norms are leaves) but the copy keeps the model's own ``forward``: only two modules
  change per pair. Pairs with hooks, parametrised weights, shared modules or attribute reads are
  left alone; a model that does not trace is copied unfolded (a debug log line, nothing else);
- on the CPU, images ``(N, C, H, W)`` run in ``channels_last`` (oneDNN's native layout).

Both change the last bits of float32 scores, as the batch size does; :func:`scoring_copy`'s
caller checks the copy's scores against the model's on the unmasked inputs once.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

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


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(convolution, batch norm)`` qualified names that :func:`fold` may fold in ``model``.

    Empty when the model does not trace with ``torch.fx``.
    """
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, (*CONVOLUTIONS, _BatchNorm)) or super().is_leaf_module(m, qualified_name)

    try:
        graph = _Tracer().trace(model)
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
    from torch.nn.utils import parametrize

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
