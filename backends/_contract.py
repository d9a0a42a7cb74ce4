"""The backend contract: what a backend is, and the only core functions it may call.

A backend is a module (one per name in ``gradcam_ref.backends.BACKENDS``) that satisfies :class:`Backend`:
it runs a model and hands the core a :class:`~gradcam_ref.Capture` (activations, gradients,
scores, targets, optionally guided backpropagation). ``gradcam_ref.explain`` talks to every
backend through this Protocol and nothing else; the core does the math
(:meth:`~gradcam_ref.Explanation.from_capture`). A backend that compiles whole programs (JAX,
TensorFlow) may run the core's ``grad_cam_fields`` inside its program and pass the result along.

Backends import core functions from here only, so that this module lists everything a backend
depends on (tests/backends/test_contract.py checks it).
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from gradcam_ref._arrays import check_feature_maps, check_finite, shape_of
from gradcam_ref._explain import (
    Capture,
    Explanation,
    GradCamFields,
    Perturbed,
    differentiable_mode,
    grad_cam_fields,
)
from gradcam_ref._guided import guided_grad_cam
from gradcam_ref._targets import (
    Target,
    check_same_batch,
    check_scores,
    check_target_scores,
    class_indices,
    resolve_targets,
)
from gradcam_ref._warnings import (
    NoGuidedReLUWarning,
    ProbabilityScoresWarning,
    TrainingModeWarning,
    ZeroGradientWarning,
    probabilities_message,
    warn_zero_gradients,
)

__all__ = [
    "Backend",
    "Capture",
    "Explanation",
    "GradCamFields",
    "NoGuidedReLUWarning",
    "Perturbed",
    "ProbabilityScoresWarning",
    "Target",
    "TrainingModeWarning",
    "ZeroGradientWarning",
    "arguments_of",
    "check_feature_maps",
    "check_finite",
    "check_same_batch",
    "check_scores",
    "check_target_scores",
    "check_where",
    "class_indices",
    "differentiable_mode",
    "explaining",
    "grad_cam_fields",
    "guided_grad_cam",
    "perturb_chunks",
    "probabilities_message",
    "resolve_targets",
    "same_parameters",
    "shape_of",
    "warn_zero_gradients",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@runtime_checkable
class Backend(Protocol):
    """A framework adapter. Modules implement it with module-level names.

    Attributes:
      NAME: the name passed as ``explain(..., backend=NAME)``.
      GUIDED: whether ``capture(..., guided=True)`` computes guided backpropagation.
      DIFFERENTIABLE: whether ``capture`` and ``explain`` take ``differentiable="stop" | "full"``
        (see ``gradcam_ref.explain``) and return arrays attached to the framework's autograd
        graph. ``gradcam_ref.explain`` passes the keyword only when it is set, and refuses it
        for a backend without the flag.
    """

    NAME: str
    GUIDED: bool
    DIFFERENTIABLE: bool

    def capture(self, model: Any, inputs: Any, target: Target = None, *, layer: Any = None,
                guided: bool = False, **options: Any) -> Capture:
        """Run ``model`` on ``inputs``; return A, dy/dA and the scores at ``layer``.

        ``target`` is parsed by ``resolve_targets`` (one set of messages for every backend);
        ``options`` are the backend's own (``at``, ``call``, ``channel_axis``, ...). The arrays
        stay in the model's library and device. The model must be left exactly as it was.
        """
        ...

    def explain(self, model: Any, inputs: Any, target: Target = None, *, layer: Any = None,
                guided: bool = False, **options: Any) -> Explanation:
        """``Explanation.from_capture(...)`` of what ``capture`` would return for these arguments.

        A backend without a compiled program may define it as ``explain = explaining(capture)``.
        """
        ...

    def score(self, model: Any, inputs: Any, **options: Any) -> Any:
        """The model's scores ``(N, classes)`` on ``inputs`` ``(N, ...)``: one forward pass, no gradients.

        NumPy ``inputs`` are converted to the model's library, dtype and device; the result stays
        there. The model is left exactly as it was (re-scoring for gradcam_ref.metrics).
        """
        ...

    def perturb(self, model: Any, inputs: Any, make: Any, *, layer: Any = None, where: str = "activations",
                batch_size: int = 32, count: Any = None, scored: Any = None, **options: Any) -> Perturbed:
        """Score the model on perturbed copies of each example, ``batch_size`` at a time, without autograd.

        One plain forward pass gives the layer's activations A (channels first) and the scores.
        Then for each example n and each chunk ``[start, stop)`` of ``range(K)`` (K = A's
        channels), ``make(inputs, A, n, start, stop)`` (a core function) returns a batch of
        ``stop - start`` perturbed copies: activations ``(b, K, *spatial)`` with
        ``where="activations"``, scored by the part of the model *after* the layer only (the
        part before it does not change), or inputs ``(b, *inputs.shape[1:])`` with
        ``where="inputs"``, scored by the whole model. Returns
        ``Perturbed(A, scores (N, C), perturbed_scores (N, K, C))``; peak memory grows with
        ``batch_size``, not K. With ``count`` (a core function), example n needs only
        ``count(A, n) <= K`` copies: the chunks cover ``range(count(A, n))`` and the rows after it
        are NaN. ``scored`` (a core function), when given, is called with the scores before any
        copy is made: the core checks the targets there, not after K forward passes. The model must
        be left exactly as it was.
        """
        ...


def same_parameters(source: Callable[_P, Any]) -> Callable[[Callable[..., _R]], Callable[_P, _R]]:
    """Decorator: the decorated ``f(*args, **kwargs)`` takes exactly ``source``'s parameters.

    A backend's ``explain`` takes its ``capture``'s arguments: the signature is written once, on
    ``capture``, and ``help()``, IDEs (``__signature__``) and type checkers (``ParamSpec``) show
    it on both. ``f`` keeps its own name, docstring and return annotation.
    """

    def decorate(function: Callable[..., _R]) -> Callable[_P, _R]:
        returns = inspect.signature(function).return_annotation
        function.__signature__ = inspect.signature(source).replace(return_annotation=returns)  # type: ignore[attr-defined]
        return function

    return decorate


def explaining(capture: Callable[_P, Capture]) -> Callable[_P, Explanation]:
    """The ``explain`` of a backend whose ``capture`` returns plain arrays: the core does the math."""

    @same_parameters(capture)
    def explain(*args: Any, **kwargs: Any) -> Explanation:
        return Explanation.from_capture(capture(*args, **kwargs))

    explain.__doc__ = f"``Explanation.from_capture(capture(...))`` of ``{capture.__module__}.capture``."
    return explain


def arguments_of(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of the call ``function(*args, **kwargs)`` by name, defaults applied (a missing
    or unknown one is the call's ``TypeError``).

    For a backend whose ``explain`` (``@same_parameters(capture)``: capture's parameters) runs the
    core's math inside the program that serves ``capture`` too: ``arguments_of(explain, args,
    kwargs)`` hands that program capture's options by name, their list written once, on ``capture``.
    """
    bound = _signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@functools.cache
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


WHERE = ("activations", "inputs")
"""What ``perturb(where=...)`` may perturb."""


def check_where(where: str) -> None:
    """``perturb``'s ``where``, checked before any work (one message for every backend)."""
    if where not in WHERE:
        raise ValueError(f"where must be 'activations' or 'inputs', got {where!r}")


def perturb_chunks(
    activations: Any, batch_size: int, count: Any = None
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """The Protocol's chunking of ``perturb``, written once: ``(n, copies, spans)`` for each example n.

    ``copies`` is ``count(activations, n)`` (K, the channels of ``activations`` ``(N, K, ...)``,
    without ``count``); ``spans`` are the ``[start, stop)`` chunks of ``range(copies)``, each
    ``batch_size`` long but the last. A backend scores ``make(inputs, A, n, start, stop)`` for
    each span and leaves rows ``copies:`` of example n NaN.
    """
    n, k = shape_of(activations)[:2]
    for i in range(n):
        given = k if count is None else count(activations, i)
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or not 0 <= int(given) <= k:
            raise ValueError(f"count(A, {i}) must be an int in [0, {k}] (A's channels), got {given!r}")
        copies = int(given)
        yield i, copies, [(start, min(start + batch_size, copies)) for start in range(0, copies, batch_size)]
