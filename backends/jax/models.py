r"""The models the JAX backend takes, each as a *seam*: where :math:`A` is taken, and the rest.

A seam is a hashable description of the model (the static argument of the compiled program)
plus its parameters, a pytree passed to the program as an ordinary argument. It offers
``forward(params, x)`` (the scores), ``activations_and_scores`` and ``linearize(params, x)``:
:math:`A`, the scores and the VJP of the part *after* the layer only.

- :class:`Split`: ``(features, head)``; ``A = features(x)``, ``jax.vjp(head, A)``.
- :class:`Linen` (a bound ``flax.linen`` module, or an unbound one and its variables), :class:`Nnx`
  (an ``nnx.Module``) and :class:`Equinox` (an ``eqx.Module``, one example per call: vmapped
  over the batch) at a named layer. The model runs unchanged except that the layer's output
  goes through a :class:`_Tap`, which keeps it and adds a perturbation :math:`\delta`:
  ``scores(delta)``, with :math:`\delta = 0`, is differentiated w.r.t. :math:`\delta` only, so
  its cotangent is :math:`\partial y / \partial A` and nothing before the layer depends on the
  differentiated variable (JAX does not linearise it). Linen taps by ``nn.intercept_methods``;
  NNX replaces the submodule in a merged copy (``nnx.split``/``nnx.merge``), Equinox by
  ``eqx.tree_at``; the user's model is never modified.

Channels: the default ``channel_axis`` is the layout of the library's convolutions (Flax linen and
NNX ``Conv``: channels-last; Equinox ``Conv``: channels-first per example, axis 1 batched).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Equinox", "Linen", "Nnx", "Split", "seam"]

CHANNELS_LAST, CHANNELS_FIRST = -1, 1


def seam(
    model: Any, layer: Any, *, variables: Any = None, call: int | None = None, params: Any = None
) -> tuple[Any, Any, int]:
    """``(seam, params, default channel_axis)`` for ``model`` at ``layer``; clear errors by name.

    ``params`` is for the split form only: ``features(params, x)`` and ``head(params, A)``.
    """
    if call is not None and (isinstance(call, bool) or not isinstance(call, int)):
        raise TypeError(f"call must be None or an int, got {call!r}")
    kind = _kind(model)
    if kind != "linen" and variables is not None:
        raise ValueError(f"variables= is for an unbound flax.linen module; got a {type(model).__name__} model")
    if kind != "split" and params is not None:
        how = _HOW_TO_DIFFERENTIATE.get(kind or "", "jax.grad")
        raise ValueError(
            f"params= is for the split form (features(params, x), head(params, A)); a {type(model).__name__} "
            f"model carries its own parameters: differentiate it with {how}"
        )
    if kind == "split":
        if layer is not None or call is not None:
            raise ValueError(
                f"in the split form (features, head) the layer is the seam between them; layer and call "
                f"must be None, got layer={shown(layer)}, call={shown(call)}"
            )
        features, head = model
        for name, fn in (("features", features), ("head", head)):
            check_hashable(name, fn)
        return Split(features, head, params is not None), params, CHANNELS_FIRST
    if kind == "linen":
        return _linen(model, layer, variables, call)
    if kind == "nnx":
        return _nnx(model, layer, call)
    if kind == "equinox":
        return _equinox(model, layer, call)
    raise TypeError(
        f"model must be a pair (features, head) of callables, features(x) -> A and head(A) -> scores, "
        f"a flax.linen module (bound, or with variables=), an nnx.Module or an eqx.Module; "
        f"got {type(model).__name__}"
    )


_HOW_TO_DIFFERENTIATE = {
    "linen": "jax.grad over the variables of module.bind(variables) (or of variables=)",
    "nnx": "nnx.grad over the model",
    "equinox": "eqx.filter_grad over the model",
}
"""How each library's users differentiate w.r.t. a model's parameters: the model carries them."""


def is_model(model: Any) -> bool:
    """Whether ``model`` is a Flax (linen, NNX) or Equinox model (without importing either)."""
    return _kind(model) in ("linen", "nnx", "equinox")


def _kind(model: Any) -> str | None:
    linen, nnx, eqx = (sys.modules.get(m) for m in ("flax.linen", "flax.nnx", "equinox"))
    if linen is not None and isinstance(model, linen.Module):
        return "linen"
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(callable(p) for p in model):
        return "split"
    return None


def check_hashable(name: str, fn: Any) -> None:
    try:
        hash(fn)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (jax.jit caches the compiled program per function), "
            f"got an unhashable {type(fn).__name__}; wrap it once in a function"
        ) from None


# --- The split form --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """``(features, head)``: :math:`A` = ``features(x)``, scores ``head(A)``.

    With ``takes_params`` the halves are ``features(params, x)`` and ``head(params, A)`` (GAIN's
    training through the maps differentiates w.r.t. ``params``); else ``params`` is None.
    """

    features: Callable[..., Any]
    head: Callable[..., Any]
    takes_params: bool = False
    what = "features(inputs)"

    def _halves(self, params: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        if not self.takes_params:
            return self.features, self.head
        return (lambda v: self.features(params, v)), (lambda a: self.head(params, a))

    def forward(self, params: Any, x: jax.Array) -> Any:
        features, head = self._halves(params)
        return head(features(x))

    def activations_and_scores(self, params: Any, x: jax.Array, check: Callable) -> tuple[Any, Any]:
        features, head = self._halves(params)
        a = check(features(x))
        return a, head(a)

    def linearize(self, params: Any, x: jax.Array, check: Callable) -> tuple[Any, Any, Callable]:
        features, head = self._halves(params)
        a = check(features(x))
        scores, vjp = jax.vjp(head, a)
        return a, scores, vjp

    def index(self, params: Any, x: jax.Array) -> int:
        return 0

    def replaced(self, params: Any, x: jax.Array, a: jax.Array, index: int) -> Any:
        """The scores ``(b, C)`` of ``head(a)``: ``a`` holds ``b`` replacements of the layer's output."""
        return self._halves(params)[1](a)


# --- Models at a named layer -----------------------------------------------------------------------


class _Tap:
    """The layer's outputs, one per call; the ``index``-th call's gets ``+ delta`` (when given)."""

    def __init__(self, delta: Any = None, index: int = 0, replace: bool = False) -> None:
        self.delta, self.index, self.replace = delta, index, replace
        self.outputs: list[Any] = []

    def __call__(self, out: Any) -> Any:
        this = len(self.outputs)
        self.outputs.append(out)
        if self.delta is not None and this == self.index:
            return self.delta if self.replace else out + self.delta  # replace: A' itself, bit for bit
        return out

    def chosen(self, call: int | None, what: str, names: Callable[[], Sequence[str]]) -> Any:
        """The output of call ``call`` (the only one when None), checked: it ran, and is one array."""
        runs = len(self.outputs)
        if runs == 0:
            known = list(names())
            close = difflib.get_close_matches(what.split("'")[1] if "'" in what else what, known, n=5, cutoff=0.6)
            hint = f"did you mean {close}?" if close else f"its layers include {known[:6]} ... {known[-3:]}"
            raise ValueError(f"{what} did not run in the forward pass; {hint}")
        if call is None and runs > 1:
            raise ValueError(
                f"{what} runs {runs} times in the forward pass: pass call= (0..{runs - 1}, or -1 for the last)"
            )
        index = 0 if call is None else call
        if not -runs <= index < runs:
            raise ValueError(f"call={call} but {what} runs {runs} time(s) in the forward pass")
        out = self.outputs[index]
        if not isinstance(out, jax.Array):
            raise TypeError(
                f"{what} must return one array (its activations A), got {type(out).__name__}; "
                f"name a submodule that returns one array"
            )
        return out


class _AtLayer:
    """What the three libraries share: a shape pass, then ``jax.vjp`` w.r.t. the perturbation."""

    call: int | None
    what: str

    def run(self, params: Any, x: jax.Array, tap: _Tap) -> tuple[Any, Any]:
        """``(scores, A)``: the model with ``tap`` on the layer's output; A = ``tap.chosen(...)``."""
        raise NotImplementedError

    def activations_and_scores(self, params: Any, x: jax.Array, check: Callable) -> tuple[Any, Any]:
        scores, a = self.run(params, x, _Tap())
        return check(a), scores

    def linearize(self, params: Any, x: jax.Array, check: Callable) -> tuple[Any, Any, Callable]:
        a_struct, index = self._shape_pass(params, x)
        check(a_struct)

        def rest(delta: jax.Array) -> tuple[Any, Any]:
            return self.run(params, x, _Tap(delta, index))

        zero = jnp.zeros(a_struct.shape, a_struct.dtype)
        scores, vjp, a = jax.vjp(rest, zero, has_aux=True)
        return a, scores, vjp

    def index(self, params: Any, x: jax.Array) -> int:
        """Which call of the layer is A (``call``, resolved against the number of calls)."""
        return self._shape_pass(params, x)[1]

    def replaced(self, params: Any, x: jax.Array, a: jax.Array, index: int) -> Any:
        """The scores ``(b, C)`` of the model on the one example ``x`` ``(1, ...)`` with the layer's
        output replaced by each row of ``a`` ``(b, *A.shape[1:])``. ``jax.vmap`` over the rows
        leaves what does not depend on them unbatched: the part before the layer runs once."""

        def one(row: jax.Array) -> Any:
            return self.run(params, x, _Tap(row[None], index, replace=True))[0][0]

        return jax.vmap(one)(a)

    def _shape_pass(self, params: Any, x: jax.Array) -> tuple[Any, int]:
        taps: list[_Tap] = []

        def shape_pass() -> Any:
            taps.append(_Tap())
            return self.run(params, x, taps[-1])[1]

        a_struct = jax.eval_shape(shape_pass)  # traced only: nothing runs
        runs = len(taps[0].outputs)
        return a_struct, (self.call if self.call is not None else 0) % runs


@dataclasses.dataclass(frozen=True, kw_only=True)
class _AtPath(_AtLayer):
    """A Flax model tapped at the submodule named by the dotted ``path`` (linen and NNX), at its
    ``call``-th call; each library's dataclass adds how it holds the model."""

    path: tuple[str, ...]
    call: int | None

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"layer {'.'.join(self.path)!r}"


def _path(layer: Any, kind: str, hint: str = "") -> tuple[str, ...]:
    """``layer``'s parts; ``hint`` ends the message of a module object given instead (:func:`_named`)."""
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be the dotted name of a submodule of the {kind} model (e.g. 'backbone.conv'), "
                        f"got {shown(layer)}{hint}")
    return tuple(layer.split("."))


def _named(layer: Any, model: Any, paths: Any) -> str:
    """The hint for a module object given as ``layer``: its name in ``model`` (``paths``: name, node pairs)."""
    found = next((name for name, node in paths if node is layer), None)
    if found is None:
        return f"; it is not a submodule of {type(model).__name__}"
    return f"; this one is at {found!r}: pass layer={found!r}"


def shown(value: Any) -> str:
    """``value`` in a one-line message: its repr if that is one short line, else what it is.

    A module's repr spans many lines (all its parameters, for NNX), an array's may.
    """
    text = repr(value)
    if "\n" in text or len(text) > 80:
        return f"a {type(value).__name__} {'module' if is_model(value) else 'object'}"
    return text


# Flax linen --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Linen(_AtPath):
    """An unbound linen module (hashable by its fields) tapped at the submodule ``path``'s ``__call__``."""

    module: Any

    def forward(self, variables: Any, x: jax.Array) -> Any:
        return self.module.apply(variables, x)

    def run(self, variables: Any, x: jax.Array, tap: _Tap) -> tuple[Any, Any]:
        from flax import linen as nn

        seen: list[str] = []

        def interceptor(next_fun: Callable, args: Any, kwargs: Any, context: Any) -> Any:
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__" or not context.module.path:
                return out
            seen.append(".".join(context.module.path))
            return tap(out) if tuple(context.module.path) == self.path else out

        with nn.intercept_methods(interceptor):
            scores = self.module.apply(variables, x)
        return scores, tap.chosen(self.call, self.what, lambda: list(dict.fromkeys(seen)))


def _linen(model: Any, layer: Any, variables: Any, call: int | None) -> tuple[Linen, Any, int]:
    if model.scope is not None:  # bound
        if variables is not None:
            raise ValueError("variables= is for an unbound linen module; this one is bound (module.bind(variables))")
        module, variables = model.unbind()
    elif variables is None:
        raise ValueError(
            f"the linen module {type(model).__name__} is unbound: pass module.bind(variables), or variables="
        )
    else:
        module = model
    if layer is not None and not isinstance(layer, str) and getattr(layer, "scope", None) is not None:
        if not layer.path:
            raise TypeError(f"layer, a bound {type(layer).__name__} module, is the root of its own binding, not a "
                            f"submodule of {type(module).__name__}: pass its dotted path (as in module.path)")
        layer = ".".join(layer.path)  # a bound submodule
    if layer is None:
        raise ValueError(f"layer is required for a linen model: the dotted path of a submodule of "
                         f"{type(module).__name__} (e.g. 'backbone.conv'), as in module.path")
    check_hashable("the linen module", module)
    return Linen(module, path=_path(layer, "linen"), call=call), variables, CHANNELS_LAST


# Flax NNX ----------------------------------------------------------------------------------------


class _Wrapped:
    """Stands in for a submodule: calls it, and passes its output through the tap."""

    def __init__(self, inner: Any, tap: _Tap) -> None:
        self.inner, self.tap = inner, tap

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tap(self.inner(*args, **kwargs))


def _get(node: Any, part: str) -> Any:
    if part.lstrip("-").isdigit() and hasattr(node, "__getitem__") and not hasattr(node, part):
        return node[int(part)]
    if isinstance(node, dict):
        return node[part]
    return getattr(node, part)


def _resolve(model: Any, path: tuple[str, ...], names: Callable[[], list[str]]) -> Any:
    node = model
    try:
        for part in path:
            node = _get(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        known = names()
        close = difflib.get_close_matches(".".join(path), known, n=5, cutoff=0.6)
        hint = f"did you mean {close}?" if close else f"its submodules include {known[:6]} ... {known[-3:]}"
        raise ValueError(f"layer {'.'.join(path)!r} is not a submodule of {type(model).__name__}; {hint}") from None
    if not callable(node):
        raise TypeError(
            f"layer {'.'.join(path)!r} of {type(model).__name__} is a {type(node).__name__}, not a callable submodule"
        )
    return node


@dataclasses.dataclass(frozen=True)
class Nnx(_AtPath):
    """An NNX model as ``nnx.split`` gives it: the graphdef (static), the state (``params``)."""

    graphdef: Any

    def forward(self, state: Any, x: jax.Array) -> Any:
        from flax import nnx

        return nnx.merge(self.graphdef, state)(x)

    def run(self, state: Any, x: jax.Array, tap: _Tap) -> tuple[Any, Any]:
        from flax import nnx

        model = nnx.merge(self.graphdef, state)  # a copy: the user's model is not touched
        parent = model
        for part in self.path[:-1]:
            parent = _get(parent, part)
        last = self.path[-1]
        if last.isdigit() and not hasattr(parent, last):
            parent[int(last)] = _Wrapped(parent[int(last)], tap)
        else:
            setattr(parent, last, _Wrapped(getattr(parent, last), tap))
        scores = model(x)
        return scores, tap.chosen(self.call, self.what, lambda: _nnx_names(model))


def _nnx_names(model: Any) -> list[str]:
    from flax import nnx

    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)]


def _nnx(model: Any, layer: Any, call: int | None) -> tuple[Nnx, Any, int]:
    from flax import nnx

    hint = ""
    if isinstance(layer, nnx.Module):  # the docs take names only; the hint names this one's
        hint = _named(layer, model, ((".".join(map(str, p)), node) for p, node in nnx.iter_graph(model) if p))
    path = _path(layer, "nnx", hint)
    _resolve(model, path, lambda: _nnx_names(model))
    training = sorted({type(node).__name__ for _, node in nnx.iter_graph(model)
                       if getattr(node, "use_running_average", None) is False
                       or getattr(node, "deterministic", None) is False})
    if training:  # their updates (batch statistics, dropout's RNG) cannot happen inside the program
        raise ValueError(
            f"the NNX model has {training} layers in training mode, which would compute the maps with "
            f"batch statistics or dropout; call model.eval() first (the backend never changes the model's mode)"
        )
    graphdef, state = nnx.split(model)
    return Nnx(graphdef, path=path, call=call), state, CHANNELS_LAST


# Equinox -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Where:
    """``eqx.tree_at``'s ``where`` for a dotted path (attribute names, sequence indices)."""

    path: tuple[str, ...]

    def __call__(self, model: Any) -> Any:
        node = model
        for part in self.path:
            node = _get(node, part)
        return node


@dataclasses.dataclass(frozen=True)
class Equinox(_AtLayer):
    """An Equinox model as ``eqx.partition(model, eqx.is_array)`` gives it; ``jax.vmap`` over the batch."""

    static: Any
    where: Callable[[Any], Any]
    call: int | None
    what: str = "layer"

    def forward(self, params: Any, x: jax.Array) -> Any:
        import equinox as eqx

        return jax.vmap(eqx.combine(params, self.static))(x)

    def run(self, params: Any, x: jax.Array, tap: _Tap) -> tuple[Any, Any]:
        import equinox as eqx

        model = eqx.combine(params, self.static)
        delta = tap.delta

        def one(xi: jax.Array, di: Any) -> tuple[Any, Any]:
            tap.outputs, tap.delta = [], di  # one trace of the vmapped body
            tapped = eqx.tree_at(self.where, model, replace_fn=lambda layer: _Wrapped(layer, tap))
            scores = tapped(xi)
            return scores, tap.chosen(self.call, self.what, lambda: _eqx_names(model))

        return jax.vmap(one, in_axes=(0, None if delta is None else 0))(x, delta)


def _eqx_names(node: Any, prefix: str = "") -> list[str]:
    import equinox as eqx

    names: list[str] = []
    if isinstance(node, eqx.nn.Sequential):
        children: list[tuple[str, Any]] = [(str(i), layer) for i, layer in enumerate(node.layers)]
    elif isinstance(node, eqx.Module):
        children = [(f.name, getattr(node, f.name, None)) for f in dataclasses.fields(node)]
    elif isinstance(node, (list, tuple)):
        children = [(str(i), item) for i, item in enumerate(node)]
    elif isinstance(node, dict):
        children = [(str(k), v) for k, v in node.items()]
    else:
        return names
    for name, child in children:
        full = f"{prefix}{name}"
        if isinstance(child, eqx.Module):
            names.append(full)
        names.extend(_eqx_names(child, full + "."))
    return names


def _equinox(model: Any, layer: Any, call: int | None) -> tuple[Equinox, Any, int]:
    import equinox as eqx

    if isinstance(layer, str):
        path = _path(layer, "equinox")
        _resolve(model, path, lambda: _eqx_names(model))
        where: Callable[[Any], Any] = _Where(path)
        what = f"layer {layer!r}"
    elif isinstance(layer, eqx.Module):  # callable, but a submodule, not a where function
        hint = _named(layer, model, ((n, _Where(tuple(n.split(".")))(model)) for n in _eqx_names(model)))
        raise TypeError(f"layer must be a dotted name (e.g. 'features.3') or a where function "
                        f"(e.g. lambda m: m.features[3]), got {shown(layer)}{hint}")
    elif callable(layer):
        check_hashable("layer (a where function)", layer)
        try:
            node = layer(model)
        except Exception as error:
            raise ValueError(f"layer, a where function, failed on the model: {error}") from error
        if not callable(node):
            raise TypeError(f"layer, a where function, must pick a callable submodule, got a {type(node).__name__}")
        where, what = layer, f"the layer picked by {getattr(layer, '__name__', 'where')}"
    else:
        raise TypeError(f"layer must be a dotted name (e.g. 'features.3') or a where function, got {shown(layer)}")
    params, static = eqx.partition(model, eqx.is_array)
    check_hashable("the Equinox model's static part", static)
    return Equinox(static, where, call, what), params, CHANNELS_FIRST
