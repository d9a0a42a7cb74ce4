"""A Keras model split at a layer, from its own graph: the ``features`` and ``head`` of a :class:`Program`.

:func:`program_for` builds (and caches: the last :data:`CACHED`) the program of a (model, layer)
or of a split form ``(features, head)``. ``features`` is a ``keras.Model`` of the model's inputs
to A and the tensors that skip over the layer; ``head`` runs the graph's nodes from there to the
output, as Keras' Functional runs them, without adding a node to the user's layers. Nothing of
the model is changed. Also found here: a linear ``Dense`` output (the classifier shortcut), a
global average before it, and a softmax output (warned about).
"""

from __future__ import annotations

import collections
import difflib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradcam_ref.backends._contract import probabilities_message
from gradcam_ref.backends.tensorflow import _program

_PROGRAMS: collections.OrderedDict[tuple[Any, ...], tuple[Any, _program.Program]] = collections.OrderedDict()
"""The last :data:`CACHED` programs, by (id of the model or of features, layer name or id of head),
each with the object it was built for (held, so that its id cannot be reused while cached); one
whose layers' activations were set anew since (:meth:`_program.Program.edited`) is built again."""


CACHED = 8
"""How many (model, layer) programs stay traced; the oldest is dropped first."""


def program_for(model: Any, layer: Any) -> tuple[_program.Program, str]:
    if isinstance(model, (tuple, list)):
        features, head = split_form(model, layer)
        key: tuple[Any, ...] = ("split", id(features), id(head))
        owner: Any = (features, head)
    else:
        if isinstance(layer, str):  # the cached program of a name already resolved: no walk over the layers
            cached = _PROGRAMS.get(("layer", id(model), layer))
            if cached is not None and cached[0] is model and not cached[1].edited():
                _PROGRAMS.move_to_end(("layer", id(model), layer))
                return cached[1], cached[1].where
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model must be a keras.Model or a (features, head) pair of TF callables, "
                f"got {type(model).__name__}"
            )
        resolved = _resolve_layer(model, layer)
        key, owner = ("layer", id(model), resolved.name), model
    cached = _PROGRAMS.get(key)
    if cached is not None and not cached[1].edited():
        _PROGRAMS.move_to_end(key)
        return cached[1], cached[1].where
    if isinstance(model, (tuple, list)):

        def whole(v: Any, features: Callable = features, head: Callable = head) -> Any:
            return head(features(v))

        watched = _with_activation([layer for part in owner if isinstance(part, keras.Layer)
                                    for layer in (part, *(found for _, found in all_layers(part)))])
        program = _program.Program(features, head, whole, "the output of features", watched=watched)
    else:
        program = _split_keras(model, resolved)
    _PROGRAMS[key] = (owner, program)
    while len(_PROGRAMS) > CACHED:
        _PROGRAMS.popitem(last=False)
    return program, program.where


def _split_keras(model: keras.Model, layer: keras.Layer) -> _program.Program:
    """``features`` up to ``layer`` (and the tensors that skip over it), ``head`` from there on."""
    graph = getattr(model, "_functional", None) or model  # a built Sequential keeps a Functional
    if not hasattr(graph, "_nodes_by_depth") or not getattr(model, "inputs", None):
        raise TypeError(
            f"model {model.name!r} ({type(model).__name__}) has no graph of layers to split at a layer "
            "name (a subclassed or unbuilt model): build it (call it once, or give it a keras.Input), "
            "or pass the split form model=(features, head)"
        )
    # A is the output of the layer's node in *this* graph: ``layer.output`` is its first node's in any
    # graph (a layer shared with another model), and a nested model's is its inner graph's tensor.
    calls = [node for nodes in graph._nodes_by_depth.values() for node in nodes if node.operation is layer]
    if len(calls) != 1:
        raise ValueError(
            f"layer {layer.name!r} is called {len(calls)} times in {model.name!r}; a layer called several "
            "times is ambiguous: pass the split form (features, head)"
        )
    a = calls[0].outputs[0] if len(calls[0].outputs) == 1 else list(calls[0].outputs)
    if isinstance(a, list):
        raise ValueError(f"layer {layer.name!r} returns {len(a)} tensors; Grad-CAM needs one (N, *spatial, K)")
    after: set[int] = {id(a)}
    frontier: list[Any] = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):  # from the inputs to the outputs
        for node in graph._nodes_by_depth[depth]:
            if node.is_input or not any(id(t) in after for t in node.input_tensors):
                continue
            frontier += [t for t in node.input_tensors if id(t) not in after and all(t is not f for f in frontier)]
            after.update(id(t) for t in node.outputs)
    outputs = list(model.outputs)
    if not all(id(t) in after for t in outputs):
        raise ValueError(f"the score does not depend on the output of layer {layer.name!r}: "
                         "no autograd path from it to the score")
    # the model's inputs are its own Input tensors: this Model adds no node to the layers
    features = keras.Model(model.inputs, [a, *frontier] if frontier else a, name=f"{model.name}_to_{layer.name}")
    producer = {id(t): n for nodes in graph._nodes_by_depth.values() for n in nodes for t in n.outputs}
    sources = [a, *frontier]
    head = _graph_part(graph, producer, sources, outputs)

    def run_features(x: Any) -> Any:
        return features(x, training=False)

    def whole(x: Any) -> Any:
        return model(x, training=False)

    classifier = None
    dense = _linear_classifier(producer, outputs, a, after)
    if dense is not None:
        h = dense.input_tensors[0]
        classifier = (_graph_part(graph, producer, sources, [h]), _graph_part(graph, producer, [h], outputs),
                      dense.operation, _pools_a(producer, h, a, frontier))
    expected = (model.name, tuple(model.inputs[0].shape)) if len(model.inputs) == 1 else None
    input_dtype = tf.as_dtype(model.inputs[0].dtype) if len(model.inputs) == 1 else None
    return _program.Program(run_features, head, whole, f"the output of layer {layer.name!r}", classifier,
                    expected=expected, input_dtype=input_dtype, probabilities=_probabilities(model, producer, outputs),
                    watched=_with_activation([found for _, found in all_layers(model)]))


def _with_activation(layers: list[keras.Layer]) -> tuple[keras.Layer, ...]:
    """The layers (each once) whose ``call`` reads an ``activation`` attribute."""
    unique = {id(layer): layer for layer in layers if hasattr(layer, "activation")}
    return tuple(unique.values())


def _graph_part(graph: Any, producer: dict[int, Any], sources: list[Any], outputs: list[Any]) -> Callable:
    """``parts -> outputs``: the nodes of ``graph`` between the tensors ``sources`` and ``outputs``,
    run on ``parts`` (one tensor per source, or the one tensor) as Keras' Functional runs its
    graph (each node's call filled in with the values, ``training=False``), and no more.

    A ``keras.Model`` of these intermediate tensors would run the same, but Keras 3 clones their
    nodes onto the user's layers at each such build: the layers' ``_inbound_nodes`` would grow
    at every explain (``producer``: the node that outputs each tensor of the graph, by ``id``)."""
    stop, needed, pending = {id(t) for t in sources}, set(), list(outputs)
    while pending:  # back from the outputs to the sources
        tensor = pending.pop()
        node = None if id(tensor) in stop else producer.get(id(tensor))
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending += node.input_tensors
    nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
             for node in graph._nodes_by_depth[depth] if id(node) in needed]

    def run(parts: Any) -> Any:
        values = {id(t): v for t, v in zip(sources, parts if len(sources) > 1 else [parts], strict=True)}
        with tf.name_scope("gradcam_ref"):  # as a model's: a layer's name may not begin a root scope ('_avg_pool')
            for node in nodes:
                args, kwargs = node.arguments.fill_in(values)
                if "training" in getattr(node.operation, "_call_context_args", ()):
                    kwargs["training"] = False
                outputs_of_node = keras.tree.flatten(node.operation(*args, **kwargs))
                values.update(zip(map(id, node.outputs), outputs_of_node, strict=False))  # as Keras pairs them
        return values[id(outputs[0])] if len(outputs) == 1 else [values[id(t)] for t in outputs]

    return run


def _probabilities(model: keras.Model, producer: dict[int, Any], outputs: list[Any]) -> str | None:
    """The warning for a model whose one output is a softmax (or log-softmax): the activation of
    its last layer (a ``Dense``, an ``Activation``, a ``Softmax``), also inside nested models."""
    if len(outputs) != 1:
        return None
    node, path = producer.get(id(outputs[0])), []
    while node is not None and isinstance(node.operation, keras.Model):  # the nested model's own last layer
        inner = getattr(node.operation, "_functional", None) or node.operation
        if not hasattr(inner, "_nodes_by_depth") or len(node.operation.outputs) != 1:
            return None
        path.append(node.operation.name)
        node = next((n for nodes in inner._nodes_by_depth.values() for n in nodes
                     if any(t is node.operation.outputs[0] for t in n.outputs)), None)
    if node is None:
        return None
    op = node.operation
    softmaxes = {keras.activations.softmax: "softmax", keras.activations.log_softmax: "log_softmax",
                 tf.nn.softmax: "softmax", tf.nn.log_softmax: "log_softmax"}
    name = "softmax" if isinstance(op, keras.layers.Softmax) else softmaxes.get(getattr(op, "activation", None))
    rank = len(outputs[0].shape)
    axes = getattr(op, "axis", -1) if isinstance(op, keras.layers.Softmax) else -1  # activations: the last
    if name is None or rank < 2 or [a % rank for a in np.atleast_1d(axes)] != [rank - 1]:  # not over the classes
        return None
    where = "/".join([*path, op.name])
    return probabilities_message(f"model {model.name!r}", name, f" {where!r} ({type(op).__name__})",
                                 f"a model without the final {name} (keras.applications: "
                                 "classifier_activation=None; the same weights load)")


def _pools_a(producer: dict[int, Any], h: Any, a: Any, frontier: list[Any]) -> bool:
    """Whether ``h`` is A's channels-last global average: ``keras.layers.GlobalAveragePooling{1,2,3}D``
    on A itself, then nothing but ``Dropout`` layers (the identity at inference), nothing else
    after the layer. ``producer``: the node that outputs each tensor of the graph, by ``id``."""
    pools = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
             keras.layers.GlobalAveragePooling3D)
    node = producer.get(id(h))
    while node is not None and type(node.operation) is keras.layers.Dropout and len(node.input_tensors) == 1:
        node = producer.get(id(node.input_tensors[0]))
    return (node is not None and not frontier and type(node.operation) in pools
            and node.operation.data_format == "channels_last" and not node.operation.keepdims
            and len(node.input_tensors) == 1 and node.input_tensors[0] is a)


def _linear_classifier(producer: dict[int, Any], outputs: list[Any], a: Any, after: set[int]) -> Any:
    """The node of the model's one output when it is a linear ``keras.layers.Dense`` on a tensor
    computed from A (``a``; ``after``: the ids of the tensors that depend on it; ``producer``: each
    tensor's node, by ``id``), else None.

    Only the plain layer: no subclass (its ``call`` may differ), no quantized kernel, no
    activation; its ``kernel`` (with LoRA, the sum it multiplies by) is read at each call.
    """
    if len(outputs) != 1 or outputs[0] is a:
        return None
    node = producer.get(id(outputs[0]))
    if node is None or type(node.operation) is not keras.layers.Dense or len(node.input_tensors) != 1:
        return None
    dense = node.operation
    if (getattr(dense, "quantization_mode", None) is not None
            or dense.activation not in (None, keras.activations.linear)
            or id(node.input_tensors[0]) not in after or len(node.input_tensors[0].shape) != 2):
        return None
    return node


def _resolve_layer(model: keras.Model, layer: Any) -> keras.Layer:
    """The layer that ``layer`` names (or is) in ``model``."""
    if isinstance(layer, keras.Layer):
        if any(candidate is layer for candidate in model.layers):
            return layer
        nested = [path for path, candidate in all_layers(model) if candidate is layer]
        if nested:
            raise ValueError(_nested_message(f"{layer.name!r} (a {type(layer).__name__})", nested[0], model))
        raise ValueError(f"layer is a {type(layer).__name__} ({layer.name!r}) that is not a layer of {model.name!r}")
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or a keras.Layer, got {type(layer).__name__}")
    names = [candidate.name for candidate in model.layers]
    if layer is None:
        raise ValueError(f"layer is required: a layer name of {model.name!r} (e.g. {names[-3:]}) or the layer itself")
    if layer in names:
        return model.get_layer(layer)
    nested = [path for path, _ in all_layers(model) if path.split("/")[-1] == layer]
    if nested:
        raise ValueError(_nested_message(repr(layer), nested[0], model))
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.6)
    hint = f"did you mean {close}?" if close else f"its layers include {names[:5]} ... {names[-3:]}"
    raise ValueError(f"layer {layer!r} is not a layer of {model.name!r}; {hint}")


def _nested_message(what: str, path: str, model: keras.Model) -> str:
    return (f"layer {what} is inside a nested model ({path}), not a layer of {model.name!r}: pass that "
            f"nested model itself (layer={path.split('/')[0]!r}) or the split form (features, head)")


def all_layers(model: keras.Layer, prefix: str = "") -> list[tuple[str, keras.Layer]]:
    found = []
    for layer in getattr(model, "layers", ()):
        path = f"{prefix}{layer.name}"
        found.append((path, layer))
        if isinstance(layer, keras.Model):
            found += all_layers(layer, path + "/")
    return found


def split_form(model: tuple[Any, ...] | list[Any], layer: Any) -> tuple[Callable, Callable]:
    if len(model) != 2 or not all(callable(m) for m in model):
        raise TypeError(
            f"the split form of model is a pair (features, head) of callables, "
            f"got {[type(m).__name__ for m in model]}"
        )
    if layer is not None:
        raise ValueError(
            "in the split form (features, head) the layer is the output of features: "
            f"leave layer unset (got layer={layer!r})"
        )
    return model[0], model[1]

