r"""The torch backend's backward pass: :math:`\partial y^c / \partial A`, from the score to the layer only.

:func:`gradients` seeds the scores one-hot and runs ``torch.autograd.grad`` down to the leaf A
(no parameter gets a ``.grad``), one batched pass (``is_grads_batched``) for ``(N, T)`` targets.
Two shortcuts give the same values to the bit where they apply: through a linear layer of a
global average the chain rule is taken by hand down to the average's input
(:func:`_pooled_seeds`), and other scores straight out of a linear layer get sparse one-hot seeds
(:func:`_sparse_seeded`). :func:`warn_if_zero_gradients` names the examples whose gradients are
zero everywhere. What each shortcut saves, measured: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any

import numpy as np
import torch

from gradcam_ref.backends._contract import (
    check_target_scores,
    warn_zero_gradients,
)


def gradients(
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


def warn_if_zero_gradients(
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

