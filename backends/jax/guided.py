r"""Guided backpropagation for plain JAX functions: the function's jaxpr, re-interpreted.

``guided(fn)`` is ``fn`` with the guided backward rule (Springenberg et al., arXiv 1412.6806) at
every ReLU it recognises: the cotangent g arriving at a ReLU with input x leaves it as
:math:`g \cdot [0 < x] \cdot [g > 0]`, or :math:`g \cdot [0 < x < b] \cdot [g > 0]` for a
ReLU capped at b (ReLU6, ``clip(x, 0, b)``; nothing passes at the kinks, as in torch). Every other
operation keeps its ordinary (or custom) derivative; the forward numbers are unchanged.

How: ``fn`` is traced to a jaxpr and evaluated again equation by equation with the same
primitives; the output y of a recognised ReLU of x goes through ``_guided(x, y, b)``, a
``jax.custom_vjp`` identity whose backward sends the rule to x. Nothing global changes;
``guided(fn)`` works under ``jit``, ``vmap`` and ``vjp`` (reverse mode only: the rule is not
linear in g). The recognised forms (``jax.nn.relu``, ``relu6``, ``jnp.maximum(x, 0)``,
``jnp.clip``, ``lax.clamp``, ``where`` gates; inside ``jit``, ``checkpoint``, ``cond``, ``scan``),
and what is left unguided (recorded in :class:`Record`), are listed in docs/backends.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

__all__ = ["Record", "guided", "relu_counts"]

_SHAPE_OPS = {"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "copy", "transpose"}
_INLINED = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
_FLIPPED = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}  # c op x  ==  x flipped(op) c
_COMPARISONS = set(_FLIPPED)
_RECOGNISED = _SHAPE_OPS | _COMPARISONS | {"max", "min", "clamp", "select_n"}
MAX_CONSTANT_SIZE = 1 << 16
"""Closed-over concrete arrays up to this many elements are read to see if they are uniform."""


@dataclasses.dataclass
class Record:
    """What a guided trace found: ``counts`` of guided ReLUs by form ("relu", "capped"; each
    occurrence in the traced program once, so a scan body's ReLU counts once however many steps
    it runs), and ``unguided``, the regions (primitive names) holding what looks like a ReLU that
    was left unguided."""

    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unguided: list[str] = dataclasses.field(default_factory=list)


def guided(fn: Callable[..., Any], record: Record | None = None) -> Callable[..., Any]:
    """``fn`` with guided ReLUs (module docstring); ``record`` collects what each trace found."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = jax.tree_util.tree_leaves(args)
        interpreter = _Interpreter(record if record is not None else Record())
        out = interpreter.run(closed.jaxpr, closed.consts, flat)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return wrapped


def relu_counts(fn: Callable[..., Any], *args: Any) -> Record:
    """Trace ``guided(fn)`` on ``args`` (arrays or ``jax.ShapeDtypeStruct``) without running it."""
    record = Record()
    jax.eval_shape(guided(fn, record), *args)
    return record


# --- the guided ReLU ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _guided(x: jax.Array, y: jax.Array, cap: float | None) -> jax.Array:
    """``y`` (a ReLU of ``x``, computed by the original operations), with the guided backward."""
    return y


def _guided_fwd(x: jax.Array, y: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array]:
    return y, x


def _guided_bwd(cap: float | None, x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    keep = (x > 0) & (g > 0)
    if cap is not None:
        keep = keep & (x < cap)
    return jnp.where(keep, g, jnp.zeros_like(g)).astype(x.dtype), jnp.zeros_like(g)


_guided.defvjp(_guided_fwd, _guided_bwd)


# --- the interpreter ---------------------------------------------------------------------------


class _Interpreter:
    """Evaluates a jaxpr with the same primitives, wrapping each recognised ReLU's output.

    Facts about values are keyed by the value object (``id``; the value is kept alive with its
    fact), so that they cross into inlined sub-jaxprs, whose inputs are the same objects:

    - ``known``: the uniform constant a value holds (a Python float), if known at trace time;
    - ``compare``: ``value = (x op c)`` with c a known constant, op normalised to x on the left;
    - ``cap``: ``value = min(x, b)`` (or the ``where`` form of it);
    - ``relu``: ``value`` is a guided ReLU of x, and whether its jaxpr uses it once (for folding
      ``min(relu(x), b)`` into one capped ReLU).
    """

    def __init__(self, record: Record) -> None:
        self.record = record
        self.facts: dict[int, tuple[Any, dict[str, tuple[Any, ...]]]] = {}

    def fact(self, value: Any, kind: str) -> tuple[Any, ...] | None:
        entry = self.facts.get(id(value))
        return entry[1].get(kind) if entry is not None and entry[0] is value else None

    def note(self, value: Any, kind: str, *data: Any) -> None:
        entry = self.facts.get(id(value))
        if entry is None or entry[0] is not value:
            entry = self.facts[id(value)] = (value, {})
        entry[1][kind] = data

    def known(self, atom: Any, value: Any) -> float | None:
        """The uniform constant ``atom`` holds, or None."""
        if isinstance(atom, Literal):
            return _uniform(atom.val)
        data = self.fact(value, "known")
        if data is not None:
            return data[0]
        if _is_concrete(value) and np.size(value) <= MAX_CONSTANT_SIZE:  # a closed-over array
            constant = _uniform(value)
            self.note(value, "known", constant)
            return constant
        return None

    # --- evaluation --------------------------------------------------------------------------

    def run(self, jaxpr: Jaxpr, consts: Any, args: Any) -> list[Any]:
        env: dict[Any, Any] = {}
        uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal))
        uses.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value

        def read(atom: Any) -> Any:
            return atom.val if isinstance(atom, Literal) else env[atom]

        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            outs = self.evaluate(eqn, invals)
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
            if len(outs) == 1:
                env[eqn.outvars[0]] = self.recognise(eqn, invals, outs[0], uses[eqn.outvars[0]] == 1)
        return [read(v) for v in jaxpr.outvars]

    def evaluate(self, eqn: Any, invals: list[Any]) -> list[Any]:
        name, params = eqn.primitive.name, eqn.params
        if name in _INLINED:
            sub = params.get("jaxpr", params.get("call_jaxpr"))
            return self.run(*_open(sub), invals)
        if name == "custom_jvp_call":
            inlined = self.inline_if_relu(params["call_jaxpr"], invals)
            if inlined is not None:
                return inlined
        elif name in ("cond", "scan"):
            key = "branches" if name == "cond" else "jaxpr"
            old = params[key] if name == "cond" else (params[key],)
            new = [self.transform(sub) for sub in old]
            if all(sub is not None for sub in new):
                params = {**params, key: tuple(new) if name == "cond" else new[0]}
            elif any(_looks_like_relu(sub) for sub in old):
                self.record.unguided.append(name)
        elif any(_looks_like_relu(sub) for sub in _subjaxprs(params)):
            self.record.unguided.append(name)
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
        return list(out) if eqn.primitive.multiple_results else [out]

    def inline_if_relu(self, closed: ClosedJaxpr, invals: list[Any]) -> list[Any] | None:
        """A custom_jvp function whose whole body is a ReLU of its one input, inlined; else None."""
        if len(invals) != 1 or len(closed.jaxpr.outvars) != 1:
            if _looks_like_relu(closed):
                self.record.unguided.append("custom_jvp_call")
            return None
        child = _Interpreter(Record())
        child.facts = {key: (value, dict(kinds)) for key, (value, kinds) in self.facts.items()}
        (out,) = child.run(*_open(closed), invals)
        data = child.fact(out, "relu")
        if data is None or data[0] is not invals[0] or sum(child.record.counts.values()) != 1:
            if _looks_like_relu(closed):
                self.record.unguided.append("custom_jvp_call")
            return None
        self.record.counts.update(child.record.counts)
        self.facts.update(child.facts)
        return [out]

    def transform(self, closed: ClosedJaxpr) -> ClosedJaxpr | None:
        """A cond branch or scan body re-interpreted with guided ReLUs, as a new closed jaxpr.

        None if the new jaxpr closes over constants (cond and scan bodies are bound without).
        """
        record = Record()
        child = _Interpreter(record)
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
        new = jax.make_jaxpr(lambda *args: child.run(*_open(closed), args))(*avals)
        if new.consts:
            return None
        self.record.counts.update(record.counts)
        self.record.unguided.extend(record.unguided)
        return new

    # --- recognition -------------------------------------------------------------------------

    def recognise(self, eqn: Any, invals: list[Any], y: Any, single_use: bool) -> Any:
        """Record facts about ``y`` and return it, guided when ``eqn`` completes a ReLU form."""
        name = eqn.primitive.name
        if name not in _RECOGNISED:
            return y
        consts = [self.known(atom, value) for atom, value in zip(eqn.invars, invals, strict=True)]
        if name in _SHAPE_OPS:
            if consts[0] is not None:
                self.note(y, "known", consts[0])
            return y
        form: tuple[Any, float | None] | None = None
        if name == "max" and len(invals) == 2:
            for i in (0, 1):
                if consts[1 - i] == 0 and consts[i] is None:
                    form = (invals[i], None)
        elif name == "min" and len(invals) == 2:
            for i in (0, 1):
                b, x = consts[1 - i], invals[i]
                if b is None or consts[i] is not None:
                    continue
                relu = self.fact(x, "relu")
                if relu is not None and relu[1] is None and relu[2]:  # min(max(x, 0), b), max used once
                    form = (relu[0], b)
                else:
                    self.note(y, "cap", x, b)
        elif name == "clamp" and len(invals) == 3:
            if consts[0] == 0 and consts[1] is None and consts[2] is not None:
                form = (invals[1], consts[2])
        elif name in _COMPARISONS and len(invals) == 2:
            for i, op in ((0, name), (1, _FLIPPED[name])):
                if consts[i] is None and consts[1 - i] is not None:
                    self.note(y, "compare", op, invals[i], consts[1 - i])
        elif name == "select_n" and len(invals) == 3:
            form = self.where_form(invals, consts, y)
        if form is None or not _is_float(y):
            return y
        x, cap = form
        counts = self.record.counts
        counts["relu" if cap is None else "capped"] += 1
        if cap is not None and name == "min":  # the max it folds in was counted as a plain ReLU
            counts["relu"] -= 1
            if not counts["relu"]:
                del counts["relu"]
        out = _guided(x, y, None if cap is None else float(cap))
        self.note(out, "relu", x, cap, single_use)
        return out

    def where_form(self, invals: list[Any], consts: list[float | None], y: Any) -> tuple[Any, float | None] | None:
        """``select_n(pred, on_false, on_true)`` as a ReLU gate, or as a cap (noted); else None."""
        compare = self.fact(invals[0], "compare")
        if compare is None:
            return None
        op, x, c = compare
        on_false, on_true = invals[1], invals[2]
        true_above = op in ("gt", "ge")  # the predicate holds for x above c
        above, below = (on_true, on_false) if true_above else (on_false, on_true)
        c_above, c_below = (consts[2], consts[1]) if true_above else (consts[1], consts[2])
        if c == 0 and c_below == 0 and c_above is None:  # zero below 0, and above it ...
            if above is x:
                return (x, None)  # ... x itself
            cap = self.fact(above, "cap")
            if cap is not None and cap[0] is x:
                return (x, cap[1])  # ... x capped at b
            return None
        if below is x and c_above == c and c_below is None:  # where(x >= c, c, x): min(x, c)
            self.note(y, "cap", x, c)
        return None


# --- helpers -----------------------------------------------------------------------------------


def _open(sub: Any) -> tuple[Jaxpr, Any]:
    """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr (no consts)."""
    if isinstance(sub, ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (ClosedJaxpr, Jaxpr)):
                found.append(item)
    return found


def _looks_like_relu(sub: Any) -> bool:
    """Whether a (sub)jaxpr has a max or clamp with a literal zero operand, at any depth."""
    jaxpr, _ = _open(sub)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("max", "clamp") and any(
            isinstance(v, Literal) and _uniform(v.val) == 0 for v in eqn.invars
        ):
            return True
        if any(_looks_like_relu(s) for s in _subjaxprs(eqn.params)):
            return True
    return False


def _is_concrete(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic, int, float)) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    )


def _uniform(value: Any) -> float | None:
    """The one value every element of a concrete real array holds, as a float; else None."""
    array = np.asarray(value)
    if array.size == 0 or array.dtype.kind not in "fiu":
        return None
    first = array.flat[0]
    if array.size > 1 and not np.all(array == first):
        return None
    return float(first)


def _is_float(y: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(y), jnp.floating)
