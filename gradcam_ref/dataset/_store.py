"""The zarr store of a data set's explanations: created once, checked on resume, one chunk per unit.

Layout (a zarr v3 group on a local directory)::

    attrs["gradcam_ref"]   the format, the settings that decide the maps (checked on resume), versions
    paths    (N,)          str, the images in order
    errors   (N,)          str, "" or why the image could not be used (its map is NaN, target -1)
    targets  (N,) / (N,T)  int64, the explained classes
    scores   (N,) / (N,T)  the model's score of each explained class
    top_classes, top_scores (N, k)  the k highest-scoring classes (k = min(5, C))
    metrics/<name> (N,...) the ``metrics=`` named (float64), or what an ``evaluate`` hook returned
    maps     (N, *spatial) / (N, T, *spatial)  at the layer's resolution, written LAST

Every array is chunked by ``batch_size`` along the first axis: unit ``u`` is chunk ``u`` of each.
zarr's LocalStore writes a chunk to a temporary file and renames it into place, so a chunk
exists whole or not at all; a unit is finished exactly when its ``maps`` chunk exists.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gradcam_ref.explain_dataset/1"
TOP_K = 5
CHECKED = ("images", "model", "layer", "method", "target", "batch_size", "preprocess", "options", "dtype", "metrics")
"""Settings that decide the maps: resuming with any of them changed is an error naming it."""


class StoreMismatch(ValueError):
    """Resuming into a store made with other settings (model, layer, method, batch size, ...)."""


def chunk_file(out: Path, group: Any, unit: int) -> Path:
    """The file of unit ``unit``'s ``maps`` chunk (e.g. ``maps/c/7/0/0``)."""
    maps = group["maps"]
    return out / "maps" / maps.metadata.encode_chunk_key((unit,) + (0,) * (maps.ndim - 1))


def done_units(out: Path, group: Any) -> set[int]:
    """The units whose ``maps`` chunk file exists (a ``.partial`` file left by a kill does not count)."""
    try:
        names = os.listdir(out / "maps" / "c")
    except FileNotFoundError:
        return set()
    return {int(name) for name in names if name.isdigit() and chunk_file(out, group, int(name)).is_file()}


def open_or_create(out: Path, settings: Mapping[str, Any], layout: Mapping[str, Any] | None,
                   paths: list[str], resume: bool) -> Any:
    """The zarr group at ``out``: checked against ``settings`` if it exists, else created.

    ``layout`` (shapes and dtypes of one image's outputs, from a probe) is needed only to create.
    Creation builds the store in a sibling temporary folder and renames it into place, so that
    several shards starting at once agree on one store and none sees it half-made.
    """
    if out.exists():
        if not resume:
            raise FileExistsError(
                f"out={str(out)!r} exists; pass resume=True (CLI --resume) to continue it, or choose another path")
        return check(out, settings)
    if layout is None:
        raise ValueError("internal: creating a store needs the layout from a probe")
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.creating"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _create(tmp, settings, layout, paths)
        try:
            os.rename(tmp, out)
        except OSError:  # another shard created it first: use theirs, if it is the same job
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check(out, settings)


def _create(root: Path, settings: Mapping[str, Any], layout: Mapping[str, Any], paths: list[str]) -> None:
    import zarr

    n, b = len(paths), int(settings["batch_size"])
    group = zarr.open_group(root, mode="w-")
    group.attrs["gradcam_ref"] = json.loads(json.dumps({"format": FORMAT, **settings, "layout": dict(layout)}))

    def array(name: str, tail: tuple[int, ...], dtype: Any, fill: Any) -> Any:
        return group.create_array(name, shape=(n, *tail), chunks=(b, *tail), dtype=dtype, fill_value=fill,
                                  config={"write_empty_chunks": True})

    paths_array = group.create_array("paths", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str)
    paths_array[:] = np.asarray(paths, dtype=str)
    array("errors", (), str, "")
    targets_tail = tuple(layout["targets"])
    array("targets", targets_tail, "int64", -1)
    array("scores", targets_tail, layout["scores_dtype"], np.nan)
    array("top_classes", (layout["top_k"],), "int64", -1)
    array("top_scores", (layout["top_k"],), layout["scores_dtype"], np.nan)
    for name, (tail, dtype) in layout.get("metrics", {}).items():
        array(f"metrics/{name}", tuple(tail), dtype, np.nan if np.dtype(dtype).kind == "f" else 0)
    array("maps", tuple(layout["maps"]), layout["dtype"], np.nan)


def check(out: Path, settings: Mapping[str, Any]) -> Any:
    """Open ``out`` for writing after checking it is our store, made with the same ``settings``."""
    import zarr

    try:
        group = zarr.open_group(out, mode="r+")
    except Exception as error:  # FileNotFoundError, a zarr error for "not a group", ...
        raise ValueError(
            f"out={str(out)!r} exists and is not a zarr group made by gradcam_ref.explain_dataset "
            f"({type(error).__name__}); choose another path") from None
    attrs = group.attrs.get("gradcam_ref")
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT or "maps" not in group:
        raise ValueError(
            f"out={str(out)!r} is a zarr group but not one made by gradcam_ref.explain_dataset "
            f"(its attrs have no 'gradcam_ref' entry of format {FORMAT!r}); choose another path")
    wanted = json.loads(json.dumps(dict(settings)))
    for key in CHECKED:
        have, want = attrs.get(key), wanted.get(key)
        if have != want:
            parts = ""
            if isinstance(have, dict) or isinstance(want, dict):  # name the entries that differ
                a, b = (v if isinstance(v, dict) else {} for v in (have, want))
                differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                parts = "; they differ in " + ", ".join(f"{k} ({_short(a.get(k))} vs {_short(b.get(k))})"
                                                         for k in differ)
            raise StoreMismatch(
                f"out={str(out)!r} was made with {key}={_short(have)}, not {_short(want)}{parts}: "
                "resume with the same settings, or choose another out")
    return group


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def write_unit(group: Any, unit: int, batch_size: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write unit ``unit``'s chunk of every array, ``maps`` last (its chunk marks the unit done)."""
    start = unit * batch_size
    for name, values in arrays.items():
        if name != "maps":
            group[name][start:start + len(values)] = values
    group["maps"][start:start + len(arrays["maps"])] = arrays["maps"]
