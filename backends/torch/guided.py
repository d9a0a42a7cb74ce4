r"""Guided backpropagation in torch: every ReLU form the model calls gets the guided backward rule.

:class:`GuidedReLUs` is a ``torch.overrides.TorchFunctionMode``: inside ``with GuidedReLUs():``
each recognised ReLU call (``_RELU_FORMS``) runs as itself in the forward pass and passes the
gradient g back as :math:`g \cdot [0 < z < b] \cdot [g > 0]` (b = inf for a plain ReLU;
Springenberg et al. 2015, arXiv 1412.6806). Everything else keeps its ordinary gradient. The
recognised forms, and what is not recognised, are listed in docs/backends.md.
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["GuidedReLUs"]


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
