"""One data set job, picklable: read a unit's images, explain them, write the unit's chunks.

The local loop, a Dask task and a Ray actor all run units through a :class:`Job`, so every engine
computes the same thing; each process opens the store and prepares the model once.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref.dataset import _store

_EXPLAIN_LOCK = threading.Lock()
"""One explanation at a time per process: backends hook the model, so two threads must not share it."""


class UnreadableImage(ValueError):
    """An image that cannot be read or preprocessed (``on_error="raise"``)."""


@dataclasses.dataclass
class Job:
    """Everything a worker needs to run any unit of one data set (see :func:`explain_dataset`)."""

    model: Any
    paths: list[str]
    out: str
    batch_size: int
    layer: Any
    target: Any
    method: str
    options: dict[str, Any]
    load: Callable[[str], np.ndarray]
    on_error: str
    device: str | None
    threads: int | None
    evaluate: Callable[..., Mapping[str, Any]] | None
    dtype: str | None
    framework: str
    shard_devices: bool = True
    input_shape: tuple[int, ...] | None = None
    metrics: tuple[str, ...] = ()
    metric_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    masks: Any = None
    boxes: Any = None
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}  # the open store and the prepared model stay in their process
        return state

    # --- units ---------------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def indices(self, unit: int) -> range:
        return range(unit * self.batch_size, min(len(self.paths), (unit + 1) * self.batch_size))

    def read(self, unit: int) -> tuple[np.ndarray | None, list[str]]:
        """Unit ``unit``'s images as one batch, and per image "" or why it could not be read.

        An unreadable image is replaced by zeros, so the batch keeps its size (torch CPU maps
        change in the last bits with the batch size); its outputs are then marked as missing.
        Readers always record; :meth:`raise_unreadable` stops there with ``on_error="raise"``.
        """
        images: list[np.ndarray | None] = []
        errors: list[str] = []
        for i in self.indices(unit):
            try:
                image = np.asarray(self.load(self.paths[i]), dtype=np.float32)
                if self.input_shape is not None and image.shape != tuple(self.input_shape):
                    raise ValueError(f"preprocessed to shape {image.shape}, not {tuple(self.input_shape)} "
                                     "like the others")
            except Exception as error:  # noqa: BLE001 - any failure to decode is recorded with its reason
                images.append(None)
                errors.append(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            else:
                images.append(image)
                errors.append("")
        shape = self.input_shape or next((im.shape for im in images if im is not None), None)
        if shape is None:
            return None, errors
        zeros = np.zeros(shape, np.float32)
        return np.stack([zeros if im is None else im for im in images]), errors

    # --- per-process state ---------------------------------------------------------------------

    def group(self) -> Any:
        if "group" not in self._cache:
            import zarr

            self._cache["group"] = zarr.open_group(self.out, mode="r+")
        return self._cache["group"]

    def prepared_model(self) -> Any:
        """The model on ``device`` (a copy when it has to move: the caller's model is left as it was)."""
        if "model" not in self._cache:
            model = self.model
            if self.framework == "torch":
                import torch

                if self.threads is not None:
                    torch.set_num_threads(self.threads)
                if self.device is not None and not _same_device(_torch_device(model), torch.device(self.device)):
                    model = copy.deepcopy(model)
                    for part in model if isinstance(model, (tuple, list)) else (model,):
                        part.to(self.device)
            self._cache["model"] = model
        return self._cache["model"]

    # --- explaining ----------------------------------------------------------------------------

    def to_inputs(self, batch: np.ndarray) -> Any:
        """The batch in the model's library, on its device (JAX: sharded over the local devices)."""
        if self.framework == "torch":
            import torch

            model = self.prepared_model()
            device = torch.device(self.device) if self.device is not None else _torch_device(model)
            return torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        if self.framework == "jax":
            return jax_sharded(batch) if self.shard_devices else batch
        return batch.astype(np.float64)

    def explain(self, batch: np.ndarray) -> tuple[Any, Any]:
        import gradcam_ref

        model = self.prepared_model()
        inputs = self.to_inputs(batch)
        kwargs = {**self.options, "method": self.method}
        target = self.target  # T classes for every image: an (n, T) array, as explain takes them
        if isinstance(target, list):
            target = np.tile(np.asarray(target, dtype=np.int64), (len(batch), 1))
        with _EXPLAIN_LOCK:
            explanation = gradcam_ref.explain(model, inputs, target, layer=self.layer, **kwargs)
            extra = {} if self.evaluate is None else dict(self.evaluate(model, inputs, explanation))
        return explanation, extra

    def outputs(self, batch: np.ndarray | None, errors: list[str], unit: int | None = None) -> dict[str, np.ndarray]:
        """The unit's arrays as stored: maps, targets, scores, top classes, metrics, errors.

        ``unit`` (which images these are) is needed for the named ``metrics`` with masks or boxes.
        """
        from gradcam_ref._arrays import to_numpy

        n = len(errors)
        if batch is None:  # no image of the unit could be read: everything is "missing"
            return self._missing(n, errors)
        explanation, extra = self.explain(batch)
        n_real = n
        maps = np.asarray(to_numpy(explanation.maps))[:n_real]
        if self.dtype is not None:
            maps = maps.astype(self.dtype)
        scores_all = np.asarray(to_numpy(explanation.scores))[:n_real]
        targets = np.asarray(explanation.targets, dtype=np.int64)[:n_real]
        scores = np.take_along_axis(scores_all, targets.reshape(n_real, -1), axis=1).reshape(targets.shape)
        k = min(_store.TOP_K, scores_all.shape[1])
        top = np.argsort(-scores_all, axis=1, kind="stable")[:, :k]
        arrays: dict[str, np.ndarray] = {
            "errors": np.asarray(errors, dtype=str),
            "targets": targets,
            "scores": scores,
            "top_classes": top.astype(np.int64),
            "top_scores": np.take_along_axis(scores_all, top, axis=1),
        }
        for name, values in extra.items():
            arrays[f"metrics/{name}"] = np.asarray(to_numpy(values))[:n_real]
        if self.metrics:
            for name, values in self.evaluations(unit, batch, maps, targets, errors).items():
                arrays[f"metrics/{name}"] = values
        arrays["maps"] = maps
        bad = np.array([e != "" for e in errors])
        if bad.any():
            for name, values in arrays.items():
                if name != "errors":
                    values = values.copy() if not values.flags.writeable else values
                    values[bad] = -1 if values.dtype.kind in "iu" else np.nan
                    arrays[name] = values
        return arrays

    def evaluations(self, unit: int | None, batch: np.ndarray, maps: np.ndarray, targets: np.ndarray,
                    errors: list[str]) -> dict[str, np.ndarray]:
        """The named ``metrics`` of the unit's readable images (NaN for the others), float64.

        Exactly :func:`gradcam_ref.evaluate` on the stored ``maps`` of those images upsampled to
        the input size (:func:`gradcam_ref.upsample`), with their inputs, targets, masks and boxes:
        recomputing that from the store gives the same numbers to the bit. T targets per image
        are T examples each; the values are stored ``(n, T)``.
        """
        import gradcam_ref
        from gradcam_ref._evaluate import FAITHFULNESS, LOCALISATION

        n, tail = len(errors), targets.shape[1:]
        per_image = int(np.prod(tail, dtype=np.int64))
        values = {name: np.full((n, *tail), np.nan) for name in self.metrics}
        ok = np.flatnonzero([not error for error in errors])
        if ok.size == 0:
            return values
        spatial = tuple(batch.shape[2:])
        upsampled = np.asarray(gradcam_ref.upsample(maps[ok], spatial)).reshape(ok.size * per_image, *spatial)
        kwargs: dict[str, Any] = {"faithfulness": tuple(m for m in self.metrics if m in FAITHFULNESS)}
        if any(m in LOCALISATION for m in self.metrics):
            if unit is None:
                raise ValueError("internal: localisation metrics need the unit's number")
            rows = [self.indices(unit)[i] for i in ok]
            if self.boxes is not None:
                kwargs["boxes"] = np.repeat(self._rows(self.boxes, rows, "boxes"), per_image, axis=0)
            if self.masks is not None:
                kwargs["masks"] = np.repeat(self._rows(self.masks, rows, "masks"), per_image, axis=0)
        with _EXPLAIN_LOCK:
            if kwargs["faithfulness"]:
                from gradcam_ref import metrics

                kwargs.update(self.metric_options, inputs=np.repeat(batch[ok], per_image, axis=0),
                              targets=targets[ok].reshape(-1),
                              score=metrics.scorer(self.prepared_model(), backend=self.framework))
            result = gradcam_ref.evaluate(upsampled, **kwargs)
        for name in self.metrics:
            values[name][ok] = result.values[name].reshape(ok.size, *tail)
        return values

    def _rows(self, source: Any, rows: list[int], what: str) -> np.ndarray:
        """Rows ``rows`` (ascending) of an array-like, or ``source(path)`` of each of their images."""
        if callable(source):
            return np.stack([np.asarray(source(self.paths[i])) for i in rows])
        block = np.asarray(source[rows[0]:rows[-1] + 1])  # one slice: numpy, zarr, memmap alike
        return block[np.asarray(rows) - rows[0]]

    def _missing(self, n: int, errors: list[str]) -> dict[str, np.ndarray]:
        group = self.group()
        arrays = {"errors": np.asarray(errors, dtype=str)}
        names = ["targets", "scores", "top_classes", "top_scores"]
        names += [f"metrics/{m}" for m in group["metrics"].array_keys()] if "metrics" in group else []
        for name in [*names, "maps"]:
            a = group[name]
            arrays[name] = np.full((n, *a.shape[1:]), -1 if a.dtype.kind in "iu" else np.nan, dtype=a.dtype)
        return arrays

    def write(self, unit: int, arrays: Mapping[str, np.ndarray]) -> None:
        _store.write_unit(self.group(), unit, self.batch_size, arrays)

    def raise_unreadable(self, unit: int, errors: list[str]) -> None:
        """With ``on_error="raise"``, :class:`UnreadableImage` for the first image ``read`` recorded."""
        if self.on_error == "raise":
            for i, error in zip(self.indices(unit), errors, strict=True):
                if error:
                    raise UnreadableImage(f"image {self.paths[i]!r}: {error}")

    def run_unit(self, unit: int) -> dict[str, Any]:
        """Read, explain and write unit ``unit``; what an engine's worker calls."""
        batch, errors = self.read(unit)
        self.raise_unreadable(unit, errors)
        self.write(unit, self.outputs(batch, errors, unit))
        return {"unit": unit, "images": len(errors), "failed": [(self.paths[i], e) for i, e in
                                                               zip(self.indices(unit), errors, strict=True) if e]}

    def first_image(self) -> tuple[int, np.ndarray]:
        """The first readable image and its number; sets ``input_shape`` (what every image must have)."""
        for i, path in enumerate(self.paths[:256]):
            try:
                image = np.asarray(self.load(path), dtype=np.float32)
            except Exception:  # noqa: BLE001 - skip unreadable images here; read() records them
                continue
            self.input_shape = tuple(image.shape)
            return i, image
        raise ValueError(f"images: none of the first {min(256, len(self.paths))} images could be read "
                         f"(the first: {self.paths[0]!r})")

    def probe(self, first: tuple[int, np.ndarray] | None = None) -> dict[str, Any]:
        """Shapes and dtypes of the outputs, from the first readable image (``first``) explained alone."""
        for i, image in [first or self.first_image()]:
            batch = image[None]
            explanation, extra = self.explain(batch)
            from gradcam_ref._arrays import to_numpy

            maps = np.asarray(to_numpy(explanation.maps))
            scores = np.asarray(to_numpy(explanation.scores))
            targets = np.asarray(explanation.targets)
            if scores.ndim != 2:
                raise ValueError(f"explain_dataset needs a model whose scores are (N, C), got shape {scores.shape}")
            both = sorted(set(extra) & set(self.metrics))
            if both:
                raise ValueError(f"evaluate returned {both}, which metrics= also names; rename them in the hook")
            return {
                "input": list(image.shape),
                "maps": list(maps.shape[1:]),
                "dtype": str(np.dtype(self.dtype) if self.dtype is not None else maps.dtype),
                "targets": list(targets.shape[1:]),
                "scores_dtype": str(scores.dtype),
                "classes": int(scores.shape[1]),
                "top_k": min(_store.TOP_K, int(scores.shape[1])),
                "metrics": {**{name: [list(np.shape(to_numpy(v))[1:]), str(np.asarray(to_numpy(v)).dtype)]
                               for name, v in extra.items()},
                            **{name: [list(targets.shape[1:]), "float64"] for name in self.metrics}},
                "probe_image": i,
            }
        raise AssertionError("unreachable")


def check_method(method: str) -> None:
    """Before any work: ``method`` is one of gradcam_ref.METHODS (explain's own check and message)."""
    from gradcam_ref._methods import check_method as check

    check(method)


def framework_of(model: Any) -> str:
    torch = sys.modules.get("torch")
    parts = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    if torch is not None and all(isinstance(p, torch.nn.Module) for p in parts):
        return "torch"
    from gradcam_ref.backends import numpy_backend

    if isinstance(model, numpy_backend.Oracle):
        return "numpy"
    if "jax" in sys.modules and isinstance(model, (tuple, list)) and len(parts) == 2 and all(map(callable, parts)):
        return "jax"
    raise TypeError(f"model must be a torch nn.Module, a (features, head) pair of torch modules or JAX callables, "
                    f"or a NumPy Oracle; got {type(model).__module__}.{type(model).__qualname__}")


def _same_device(have: Any, want: Any) -> bool:
    """``cuda:0`` is ``cuda`` (the current device) when no index is asked for."""
    return bool(have.type == want.type and (want.index is None or have.index == want.index))


def _torch_device(model: Any) -> Any:
    import torch

    for part in model if isinstance(model, (tuple, list)) else (model,):
        for tensor in part.parameters():
            return tensor.device
        for tensor in part.buffers():
            return tensor.device
    return torch.device("cpu")


def jax_sharded(batch: np.ndarray) -> Any:
    """``batch`` on every local device, split along its first axis (``NamedSharding``).

    A batch whose size is not a multiple of the device count stays on the default device.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    if len(devices) < 2 or batch.shape[0] % len(devices):
        return jax.numpy.asarray(batch)
    mesh = Mesh(np.asarray(devices), ("batch",))
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch")))


def fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a model in the store: its class, and a SHA-256 of its weights.

    A torch model's ``state_dict``; otherwise every array the model holds (:func:`array_digest`):
    the oracle's ``params``, a JAX ``(features, head)`` pair's closures and the globals they
    read, a pytree module's leaves. Two models whose weights differ are told apart.
    """
    import hashlib

    parts = tuple(model) if isinstance(model, (tuple, list)) else (model,)
    names = [f"{kind.__module__}.{kind.__qualname__}" for kind in
             (p if inspect.isfunction(p) or isinstance(p, type) else type(p) for p in parts)]
    torch = sys.modules.get("torch")
    if torch is None or not all(isinstance(p, torch.nn.Module) for p in parts):
        digest = array_digest(parts)
        return {"class": names} if digest is None else {"class": names, "sha256": digest}
    sha = hashlib.sha256()
    for part in parts:
        for key, tensor in part.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            sha.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"class": names, "sha256": sha.hexdigest()}


def array_digest(value: Any) -> str | None:
    """A SHA-256 of every array ``value`` holds (dtype, shape and bytes, in a fixed order), or None
    when it holds none: through lists, tuples and dicts, a function's closure, defaults and the
    globals it reads, ``functools.partial``'s arguments, an object's ``params`` and a JAX pytree's
    leaves (Flax, Equinox). ``repr`` would not do: NumPy and JAX shorten long arrays with ``...``.
    """
    import functools
    import hashlib

    # seen holds the objects, not only their ids: the lists made below live only while visited, and
    # a freed one's id is soon another's (a pair's head would be skipped as its features' list)
    seen: dict[int, Any] = {}
    sha, found = hashlib.sha256(), [False]

    def visit(x: Any, depth: int) -> None:
        if depth > 8 or id(x) in seen or isinstance(x, (str, bytes, int, float, bool, type(None), type)):
            return
        seen[id(x)] = x
        if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__"):
            host = np.ascontiguousarray(np.asarray(x))
            sha.update(f"{host.dtype}:{host.shape}".encode())
            sha.update(host.tobytes())
            found[0] = True
        elif isinstance(x, dict):
            for key in sorted(x, key=repr):
                visit(x[key], depth + 1)
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item, depth + 1)
        elif isinstance(x, functools.partial):
            visit([x.func, x.args, x.keywords], depth + 1)
        elif inspect.isfunction(x):
            cells = [cell.cell_contents for cell in x.__closure__ or () if _filled(cell)]
            read = inspect.getclosurevars(x).globals
            visit([cells, x.__defaults__, {k: v for k, v in read.items() if not inspect.ismodule(v)}], depth + 1)
        else:
            params = getattr(x, "params", None)
            if params is not None and not callable(params):
                visit(params, depth + 1)
            elif "jax" in sys.modules:
                leaves = sys.modules["jax"].tree_util.tree_leaves(x)
                if not (len(leaves) == 1 and leaves[0] is x):  # a pytree (Flax, Equinox): its leaves
                    visit(leaves, depth + 1)

    visit(value, 0)
    return sha.hexdigest() if found[0] else None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("gradcam-ref", "numpy", "zarr", "torch", "jax", "pillow", "dask", "distributed", "ray"):
        module = {"gradcam-ref": "gradcam_ref", "pillow": "PIL"}.get(name, name)
        if name in ("numpy", "zarr", "gradcam-ref", "pillow") or module in sys.modules:
            loaded = getattr(sys.modules.get(module), "__version__", None)  # torch: with its build, +cu130
            try:
                found[name] = str(loaded) if loaded else version(name)
            except PackageNotFoundError:
                pass
    return found


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def as_path(out: Any) -> Path:
    return Path(os.fspath(out))
