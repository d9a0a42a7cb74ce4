"""Explain a whole data set into a zarr store: chunked, resumable, on one machine, Dask or Ray.

One work unit is one batch of ``batch_size`` images and one chunk of every array of the store
(layout: :mod:`gradcam_ref.dataset._store`). A unit's ``maps`` chunk is written last, through a
temporary file renamed into place, so its presence means the unit is complete; a rerun skips
those units and recomputes nothing else. :class:`_job.Job` runs a unit (read, explain, write)
in the local loop, in a Dask task or in a Ray Data actor alike, so the engines agree to the bit
at the same batch size, device and threads. Images are decoded in worker processes (torch's
``DataLoader`` for torch models) while the model works; memory holds a few batches, never the
data set. Frameworks, zarr and the engines are imported only when used. Running at scale, the
engines and the memory settings: docs/scale.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref.dataset import _job, _store
from gradcam_ref.dataset._job import UnreadableImage
from gradcam_ref.dataset._store import StoreMismatch
from gradcam_ref.zoo import IMAGENET_MEAN, IMAGENET_SIZE, IMAGENET_STD

__all__ = ["DatasetSummary", "Interrupted", "Preprocess", "StoreMismatch", "UnreadableImage", "explain_dataset",
           "list_images", "parse_shard"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
LIST_SUFFIXES = (".txt", ".lst", ".list")
ENGINES = ("local", "dask", "ray")
ON_ERROR = ("record", "raise")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The default image pipeline, picklable: RGB, resized to ``size`` (Pillow bicubic, aspect not kept),
    scaled to [0, 1], standardised by ``mean``/``std``; returns ``(3, H, W)`` float32.

    The same steps as ``gradcam-ref explain``, so a map of the store equals the command's.
    """

    size: tuple[int, int] = (IMAGENET_SIZE, IMAGENET_SIZE)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            rgb = image.convert("RGB")
        resized = np.asarray(rgb.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC), dtype=np.uint8)
        scaled = resized.astype(np.float32) / np.float32(255)
        standard = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(standard.transpose(2, 0, 1))

    def describe(self) -> dict[str, Any]:
        return {"pipeline": "gradcam_ref.dataset.Preprocess", "size": list(self.size),
                "mean": list(self.mean), "std": list(self.std)}


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """What a run did: ``failed`` lists ``(path, reason)`` of the images that could not be read;
    ``startup_seconds``: from the call to the first unit (checks, probe, store), within ``seconds``."""

    out: str
    images: int
    units: int
    units_in_shard: int
    skipped_units: int
    computed_units: int
    computed_images: int
    failed: tuple[tuple[str, str], ...]
    seconds: float
    engine: str
    interrupted: bool = False
    startup_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed_images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        state = "stopped early (rerun to resume)" if self.interrupted else "done"
        text = (f"{state}: {self.computed_units} units ({self.computed_images} images) computed in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} images/s, {self.engine}), "
                f"{self.skipped_units} units already in the store, "
                f"{self.units_in_shard - self.skipped_units - self.computed_units} left; "
                f"{len(self.failed)} unreadable images; store {self.out}")
        return text


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after its current unit; the finished chunks are valid.

    ``summary`` says what was done; ``signal`` is the signal's number.
    """

    def __init__(self, summary: DatasetSummary, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; {summary}")
        self.summary = summary
        self.signal = signum


def list_images(images: Any) -> list[str]:
    """Absolute image paths from a folder (searched recursively, sorted), a list file or a sequence.

    A list file (``.txt``, ``.lst``, ``.list``) holds one path per line, relative to its folder;
    blank lines and lines starting with ``#`` are skipped.
    """
    if isinstance(images, (str, os.PathLike)):
        path = Path(os.fspath(images))
        if path.is_dir():
            found = sorted(str(p.resolve()) for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"images={str(path)!r}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            return found
        if path.suffix.lower() in LIST_SUFFIXES:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"images={str(path)!r}: cannot read the list file ({error})") from None
            found = [str((path.parent / line.strip()).resolve()) for line in lines
                     if line.strip() and not line.lstrip().startswith("#")]
            if not found:
                raise ValueError(f"images={str(path)!r}: the list file names no image")
            return found
        if path.exists():
            return [str(path.resolve())]
        raise ValueError(f"images={str(path)!r}: no such folder, list file or image")
    if isinstance(images, Sequence) and not isinstance(images, bytes):
        if not images:
            raise ValueError("images: an empty sequence; expected paths, a folder or a list file")
        bad = [p for p in images if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise TypeError(f"images: expected paths (str or os.PathLike), got a {type(bad[0]).__name__}")
        return [str(Path(os.fspath(p)).resolve()) for p in images]
    raise TypeError(f"images must be a folder, a list file or a sequence of paths, got {type(images).__name__}")


def parse_shard(shard: Any) -> tuple[int, int] | None:
    """``None``, ``(i, n)`` or ``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    if shard is None:
        return None
    given = shard
    if isinstance(shard, str):
        parts = shard.split("/")
        try:
            shard = tuple(int(p) for p in parts) if len(parts) == 2 else ()
        except ValueError:
            shard = ()
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, n) or 'i/n' with 0 <= i < n, got {given!r}")
    return int(shard[0]), int(shard[1])


def shard_units(n_units: int, shard: tuple[int, int] | None) -> range:
    """Shard ``i`` of ``n`` owns the contiguous units ``[i*U//n, (i+1)*U//n)``."""
    if shard is None:
        return range(n_units)
    i, n = shard
    return range(i * n_units // n, (i + 1) * n_units // n)


def explain_dataset(
    model: Any,
    images: Any,
    *,
    layer: Any = None,
    target: int | Sequence[int] | None = None,
    method: str = "grad-cam",
    out: str | os.PathLike[str] = "maps.zarr",
    batch_size: int = 16,
    device: str | None = None,
    resume: bool = True,
    shard: tuple[int, int] | str | None = None,
    num_workers: int | None = None,
    size: int | tuple[int, int] = IMAGENET_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    load: Callable[[str], np.ndarray] | None = None,
    dtype: str | None = None,
    on_error: str = "record",
    threads: int | None = None,
    evaluate: Callable[..., Mapping[str, Any]] | None = None,
    metrics: Sequence[str] = (),
    masks: Any = None,
    boxes: Any = None,
    metric_options: Mapping[str, Any] | None = None,
    engine: str = "local",
    workers: int = 2,
    scheduler: Any = None,
    num_gpus: float | None = None,
    progress: bool = True,
    **options: Any,
) -> DatasetSummary:
    """Explain every image of ``images`` with ``model`` at ``layer`` into the zarr store ``out``.

    Each unit of ``batch_size`` images is read, explained by :func:`gradcam_ref.explain`
    (``method``, ``target``, ``layer`` and ``**options`` passed as they are) and written as one
    chunk of each array, the maps last. Arrays (first axis: the N images in order): ``maps``
    ``(N, *spatial)`` at the layer's resolution (``(N, T, *spatial)`` for T targets), ``targets``,
    ``scores`` (the explained classes' scores), ``top_classes``/``top_scores`` (the 5 best),
    ``errors`` ("" or why an image could not be read), ``paths``, and ``metrics/<name>`` when
    ``evaluate`` is given. ``attrs["gradcam_ref"]`` records the model (class and SHA-256 of its
    weights: ``_job.fingerprint``), layer, method, target, batch size, preprocessing, dtype and library versions.

    Args:
      model: a torch ``nn.Module`` (or ``(features, head)`` pair), a JAX ``(features, head)``
        pair, or a NumPy ``Oracle``. It is left as it is (moved copies run on ``device``).
      images: a folder (recursive), a list file (``.txt``: one path a line) or a sequence of paths.
      layer: where to take :math:`A`, as :func:`gradcam_ref.explain` takes it.
      method: the CAM method, passed to :func:`gradcam_ref.explain` (default ``"grad-cam"``).
      target: None (each image's top class), a class index, or a sequence of T indices.
      out: a local directory; created if absent, resumed if it is a store of the same job.
      batch_size: images per unit and per chunk (maps depend on it in the last bits on torch CPU).
      device: where a torch model runs (None: where its parameters are).
      resume: continue an existing store (finished units are skipped); False refuses to touch one.
      shard: ``(i, n)`` or ``"i/n"``: run only the i-th of n contiguous blocks of units (job arrays).
      num_workers: processes decoding images (torch's DataLoader; threads for other models);
        None: ``min(4, cpus - 1)``; 0 decodes in this process.
      size: the default preprocessing's input size, an int or ``(height, width)`` (:class:`Preprocess`).
      mean: its per-channel mean, for pixels scaled to [0, 1].
      std: its per-channel standard deviation.
      load: replaces the default preprocessing: any picklable ``path -> (C, ...) array``.
      dtype: dtype of the stored maps (None: the model's, e.g. float32).
      on_error: ``"record"`` (default): an unreadable image gets a NaN map, target -1 and its
        reason in ``errors``, and the run goes on (the rest of its batch is explained as usual,
        bit-identically); ``"raise"``: stop with :class:`UnreadableImage` naming it.
      threads: torch threads in every process running units (None: leave as set).
      evaluate: ``(model, inputs, explanation) -> {name: (n, ...) array}``, run on every unit in
        the same pass and stored as ``metrics/<name>``.
      metrics: metric names of :func:`gradcam_ref.evaluate`, scored in the same pass and stored as
        ``metrics/<name>`` (float64, ``(N,)`` or ``(N, T)``; NaN for unreadable images), written
        with the unit's maps: localisation (``gradcam_ref._evaluate.LOCALISATION``, needing
        ``masks`` or ``boxes``; ``weakly_supervised_localisation`` needs ``boxes``) and
        faithfulness (``FAITHFULNESS``, re-scoring ``model``). Each value is
        :func:`gradcam_ref.evaluate` on the unit's stored maps upsampled to the input size.
      masks: the images' ground-truth masks at the model's input size: an ``(N, H, W)`` array-like
        read a unit at a time (NumPy, memmap, zarr), or a picklable ``path -> (H, W)`` callable.
      boxes: the images' boxes ``(x0, y0, x1, y1)`` in input pixels, half-open: an ``(N, 4)``
        array-like or a picklable ``path -> 4 ints`` callable.
      metric_options: passed to :func:`gradcam_ref.evaluate`: ``steps``, ``batch_size`` (inputs per
        re-scoring call), ``seed``, ``road_percentages`` (its defaults otherwise).
      engine: ``"local"`` (this process), ``"dask"`` or ``"ray"`` (see docs/scale.md).
      workers: the workers of a local Dask cluster, or the Ray actors.
      scheduler: a Dask ``Client`` or scheduler address, or a Ray address (None: start a local one).
      num_gpus: GPUs per Ray actor (None: 1 when ``device`` is CUDA, else 0).
      progress: a tqdm bar with images/s and ETA on stderr.
      **options: passed to :func:`gradcam_ref.explain` (e.g. ``call=``, ``at=``).

    Returns:
      A :class:`DatasetSummary`. Ctrl-C or SIGTERM stops after the current unit with
      :class:`Interrupted` (a ``KeyboardInterrupt``) carrying the summary.

    Raises:
      StoreMismatch: ``out`` was made with another model, layer, method, batch size, ...
      ValueError: ``out`` exists but is not such a store; bad arguments, named.
      OSError: a unit could not be written (e.g. a full disk); earlier units stay valid.
    """
    start = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be None or an int >= 0, got {num_workers!r}")
    if num_gpus is not None and (not isinstance(num_gpus, (int, float)) or num_gpus < 0):
        raise ValueError(f"num_gpus must be None or a number >= 0, got {num_gpus!r}")
    target = _check_target(target)
    _job.check_method(method)
    shard_ = parse_shard(shard)
    paths = list_images(images)
    metric_names, metric_options_ = _check_metrics(metrics, masks, boxes, metric_options, len(paths))
    if load is None:
        load = Preprocess(_size(size), _stats("mean", mean), _stats("std", std, positive=True))
    framework = _job.framework_of(model)
    out_path = _job.as_path(out)
    job = _job.Job(model=model, paths=paths, out=str(out_path), batch_size=int(batch_size), layer=layer,
                   target=target, method=method, options=dict(options), load=load, on_error=on_error,
                   device=device, threads=threads, evaluate=evaluate, dtype=dtype, framework=framework,
                   metrics=metric_names, metric_options=metric_options_, masks=masks, boxes=boxes)
    settings = {
        "images": {"count": len(paths), "sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()},
        "model": _job.fingerprint(model),
        "layer": layer if isinstance(layer, (str, int, type(None))) else f"<{type(layer).__name__}>",
        "method": method,
        "target": target,
        "batch_size": int(batch_size),
        "preprocess": load.describe() if hasattr(load, "describe") else {"load": _qualname(load)},
        "options": {k: _job.array_digest(v) or repr(v) for k, v in sorted(options.items())},  # long arrays
        "dtype": dtype,
        "metrics": None if not metric_names and evaluate is None else {
            "names": list(metric_names), "options": metric_options_, "masks": _describe(masks),
            "boxes": _describe(boxes), "evaluate": None if evaluate is None else _qualname(evaluate)},
    }
    units = shard_units(job.n_units, shard_)
    reading: _ReadAhead | None = None
    # A new store: a Dask engine is connected first, so that its workers warm up during the probe.
    early = engine == "dask" and not out_path.exists()
    with _threads(framework, threads), _connect(early, workers, scheduler, framework) as connection:
        try:
            layout = None
            if not out_path.exists():
                first = job.first_image()
                if engine == "local":
                    # A new store: decoding starts now, while the model is probed and the store made.
                    reading = _ReadAhead(job, list(units), num_workers)
                layout = job.probe(first)
                _check_masks_and_boxes(masks, boxes, tuple(layout["input"]))  # before the store is made
            group = _store.open_or_create(out_path, settings, layout, paths, resume)
            _record_run(group, device=device, on_error=on_error, layout=layout)
            job.input_shape = tuple(group.attrs["gradcam_ref"]["layout"]["input"])
            if layout is None:
                _check_masks_and_boxes(masks, boxes, job.input_shape)
            done = _store.done_units(out_path, group)
        except BaseException:
            if reading is not None:
                reading.close()
            raise
        pending = [u for u in units if u not in done]
        skipped = len(units) - len(pending)
        gpus = num_gpus if num_gpus is not None else float(str(device or "").startswith("cuda"))
        return _run(job, pending, units=units, skipped=skipped, engine=engine, workers=workers,
                    scheduler=scheduler, num_workers=num_workers, progress=progress, start=start, gpus=gpus,
                    connection=connection, reading=reading)


def _connect(early: bool, workers: int, scheduler: Any, framework: str) -> Any:
    if not early:
        return contextlib.nullcontext()
    from gradcam_ref.dataset import _engines

    return _engines.connect("dask", workers=workers, scheduler=scheduler, framework=framework)


def _record_run(group: Any, *, device: Any, on_error: str, layout: Any) -> None:
    """Versions and settings of the first run (not checked on resume): written once, at creation."""
    attrs = dict(group.attrs["gradcam_ref"])
    if "versions" not in attrs:
        attrs.update(versions=_job.versions(), device=str(device), on_error=on_error,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        group.attrs["gradcam_ref"] = attrs


def _run(job: _job.Job, pending: list[int], *, units: range, skipped: int, engine: str, workers: int,
         scheduler: Any, num_workers: int | None, progress: bool, start: float, gpus: float,
         connection: Any = None, reading: _ReadAhead | None = None) -> DatasetSummary:
    from tqdm import tqdm

    failed: list[tuple[str, str]] = []
    computed = images_done = 0
    total_images = sum(len(job.indices(u)) for u in pending)
    stopper = _Stopper()
    bar = tqdm(total=total_images, unit="img", desc=f"explain_dataset ({engine})", disable=not progress or None,
               file=sys.stderr, smoothing=0.1)

    startup = time.perf_counter() - start  # arguments, probe, store: until the first unit starts

    def summary(interrupted: bool = False) -> DatasetSummary:
        return DatasetSummary(out=job.out, images=len(job.paths), units=job.n_units, units_in_shard=len(units),
                              skipped_units=skipped, computed_units=computed, computed_images=images_done,
                              failed=tuple(failed), seconds=time.perf_counter() - start, engine=engine,
                              interrupted=interrupted, startup_seconds=startup)

    results = _results(job, pending, engine=engine, workers=workers, scheduler=scheduler,
                       num_workers=num_workers, stopper=stopper, gpus=gpus, connection=connection,
                       reading=reading)
    try:
        with stopper, bar:
            for result in results:
                computed += 1
                images_done += result["images"]
                failed.extend(result["failed"])
                bar.update(result["images"])
                if stopper.signum is not None:
                    break
    finally:
        with contextlib.suppress(Exception):
            results.close()  # type: ignore[attr-defined]
    if stopper.signum is not None:
        raise Interrupted(summary(True), stopper.signum)
    return summary()


def _results(job: _job.Job, pending: list[int], *, engine: str, workers: int, scheduler: Any,
             num_workers: int | None, stopper: _Stopper, gpus: float,
             connection: Any = None, reading: _ReadAhead | None = None) -> Iterator[dict[str, Any]]:
    if not pending:  # nothing to do: start no cluster
        if reading is not None:
            reading.close()
        return iter(())
    if engine == "dask":
        from gradcam_ref.dataset import _engines

        return _engines.dask_units(job, pending, workers=workers, scheduler=scheduler, stopper=stopper,
                                   connection=connection)
    if engine == "ray":
        from gradcam_ref.dataset import _engines

        return _engines.ray_units(job, pending, workers=workers, address=scheduler, stopper=stopper, num_gpus=gpus)
    return _local_units(job, pending, num_workers, reading)


def _local_units(job: _job.Job, pending: list[int], num_workers: int | None,
                 reading: _ReadAhead | None = None) -> Iterator[dict[str, Any]]:
    """Read ahead in workers, explain here, write in a thread while the next unit is explained.

    At most one write is in flight; it is waited for before the next one starts and when the
    loop ends for any reason, so a unit is reported only once its maps chunk is in place.
    ``reading``: a read-ahead started earlier (it may hold units that are not pending: skipped).
    """
    from concurrent.futures import ThreadPoolExecutor

    def report(unit: int, errors: list[str]) -> dict[str, Any]:
        return {"unit": unit, "images": len(errors),
                "failed": [(job.paths[i], e) for i, e in zip(job.indices(unit), errors, strict=True) if e]}

    reader = reading if reading is not None else _ReadAhead(job, pending, num_workers)
    wanted = set(pending)
    with ThreadPoolExecutor(1, thread_name_prefix="gradcam-ref-writer") as writer:
        writing: tuple[Any, dict[str, Any]] | None = None
        try:
            for unit, batch, errors in reader:
                if unit not in wanted:
                    continue
                job.raise_unreadable(unit, errors)
                arrays = job.outputs(batch, errors, unit)
                if writing is not None:
                    future, done = writing
                    writing = None
                    future.result()
                    yield done
                writing = (writer.submit(job.write, unit, arrays), report(unit, errors))
            if writing is not None:
                future, done = writing
                writing = None
                future.result()
                yield done
        finally:
            reader.close()
            if writing is not None:  # stopped or failed: let the write in flight finish whole
                writing[0].exception()


class _UnitReader:
    """A map-style data set of units for torch's DataLoader: item i is ``(unit, batch, errors)``."""

    def __init__(self, job: _job.Job, units: list[int]) -> None:
        self.job, self.units = job, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, list[str]]:
        unit = self.units[i]
        batch, errors = self.job.read(unit)
        return unit, batch, errors


def _as_is(item: Any) -> Any:
    return item


def _ignore_sigint(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop


class _ReadAhead:
    """Decoded units ``(unit, batch, errors)`` in order, read ahead by worker processes (torch's
    DataLoader) or threads (other models), ``num_workers`` of them (0: read when asked for).

    Started at once: the workers decode while the caller still probes the model and makes the
    store. :meth:`close` stops them (unread units are dropped).
    """

    def __init__(self, job: _job.Job, units: list[int], num_workers: int | None) -> None:
        workers = min(_job.default_workers() if num_workers is None else num_workers, len(units))
        self._pool: Any = None
        self._items: Iterator[tuple[int, Any, list[str]]]
        if workers == 0:
            self._items = ((unit, *job.read(unit)) for unit in units)
        elif job.framework == "torch":
            from torch.utils.data import DataLoader

            # Forking a process that runs JAX's threads can deadlock (JAX warns): spawn workers then.
            context = "spawn" if "jax" in sys.modules else None
            loader: Any = DataLoader(_UnitReader(job, units), batch_size=None,  # type: ignore[arg-type]
                                     num_workers=workers, collate_fn=_as_is, prefetch_factor=2,
                                     worker_init_fn=_ignore_sigint, multiprocessing_context=context)
            self._items = iter(loader)  # the workers start and are sent their first units
        else:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="gradcam-ref-reader")
            self._items = self._threaded(job, units, 2 * workers)

    def _threaded(self, job: _job.Job, units: list[int], ahead: int) -> Iterator[tuple[int, Any, list[str]]]:
        queue = iter(units)
        futures = [(unit, self._pool.submit(job.read, unit)) for unit in itertools.islice(queue, ahead + 1)]

        def results() -> Iterator[tuple[int, Any, list[str]]]:
            while futures:
                unit, future = futures.pop(0)
                following = next(queue, None)
                if following is not None:
                    futures.append((following, self._pool.submit(job.read, following)))
                yield (unit, *future.result())

        return results()

    def __iter__(self) -> _ReadAhead:
        return self

    def __next__(self) -> tuple[int, Any, list[str]]:
        return next(self._items)

    def close(self) -> None:
        """Stop reading: a DataLoader's workers exit once its iterator is dropped; threads finish their image."""
        self._items = iter(())
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Stopper:
    """SIGINT/SIGTERM handlers for a run: the first asks to stop after the current unit, a second
    Ctrl-C stops at once. Installed only from the main thread; restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nexplain_dataset: {signal.Signals(signum).name}: stopping after the current unit "
              "(Ctrl-C again to stop at once; finished units stay valid)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()


@contextlib.contextmanager
def _threads(framework: str, threads: int | None) -> Iterator[None]:
    """torch's thread count set to ``threads`` in this process for the run, then restored."""
    if framework != "torch" or threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_target(target: Any) -> int | list[int] | None:
    if target is None:
        return None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and target >= 0:
        return int(target)
    if isinstance(target, Sequence) and not isinstance(target, str) and target and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in target):
        return [int(t) for t in target]
    raise ValueError(f"target must be None (each image's top class), a class index >= 0 or a non-empty sequence "
                     f"of them (the same for every image), got {target!r}")


def _size(size: Any) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _stats(name: str, values: Sequence[float], positive: bool = False) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) not in (1, 3) or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        raise ValueError(f"{name} must be 1 or 3 finite numbers{' > 0' if positive else ''}, got {values!r}")
    return out


def _check_metrics(names: Any, masks: Any, boxes: Any, options: Mapping[str, Any] | None,
                   n: int) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``metrics=`` as sorted unique names, and the options of :func:`gradcam_ref.evaluate` they use."""
    import inspect

    from gradcam_ref._evaluate import FAITHFULNESS, LOCALISATION, evaluate

    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"metrics must be a sequence of metric names, got {names!r}")
    unknown = [m for m in names if m not in LOCALISATION + FAITHFULNESS]
    if unknown:
        raise ValueError(f"metrics must name metrics among {LOCALISATION + FAITHFULNESS}, got {unknown}")
    chosen = tuple(sorted(set(names)))
    localisation = [m for m in chosen if m in LOCALISATION]
    if localisation and masks is None and boxes is None:
        raise ValueError(f"metrics={list(localisation)} need masks= or boxes= (the images' ground truth), got neither")
    if "weakly_supervised_localisation" in chosen and boxes is None:
        raise ValueError("metrics=['weakly_supervised_localisation'] needs boxes=, got None")
    if (masks is not None or boxes is not None) and not localisation:
        given = "masks" if masks is not None else "boxes"
        raise ValueError(f"{given}= is given but metrics={list(chosen)} names no localisation metric "
                         f"(among {LOCALISATION})")
    for name, source, tail in (("masks", masks, None), ("boxes", boxes, (4,))):
        if source is None or callable(source):
            continue
        shape = getattr(source, "shape", None)
        if shape is None or len(shape) < 1 or shape[0] != n or (tail is not None and tuple(shape[1:]) != tail):
            want = f"({n}, 4)" if tail else f"({n}, H, W)"
            raise ValueError(f"{name} must be a callable or an array-like of shape {want} (one row per image), "
                             f"got {type(source).__name__} of shape {shape}")
    defaults = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()
                if k in ("steps", "batch_size", "seed", "road_percentages")}
    options = dict(options or {})
    bad = sorted(set(options) - set(defaults))
    if bad:
        raise ValueError(f"metric_options takes {sorted(defaults)}, got {bad}")
    if not any(m in FAITHFULNESS for m in chosen):
        return chosen, {}
    resolved = {**defaults, **options}
    resolved["road_percentages"] = [float(p) for p in resolved["road_percentages"]]
    for key in ("steps", "batch_size"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"metric_options[{key!r}] must be a positive int, got {value!r}")
        resolved[key] = int(value)
    return chosen, resolved


def _check_masks_and_boxes(masks: Any, boxes: Any, input_shape: tuple[int, ...]) -> None:
    """Array masks at the input's spatial size; array boxes of integers inside it (checked once, up front)."""
    spatial = tuple(input_shape[1:])
    if masks is not None and not callable(masks) and tuple(masks.shape[1:]) != spatial:
        raise ValueError(f"masks must be at the model's input size (N, {', '.join(map(str, spatial))}), "
                         f"got shape {tuple(masks.shape)}")
    if boxes is not None and not callable(boxes):
        if len(spatial) != 2:
            raise ValueError(f"boxes need 2-D inputs, got input shape {input_shape}")
        b = np.asarray(boxes)
        if b.dtype.kind not in "iuf":
            raise TypeError(f"boxes must hold integer pixel coordinates, got {b.dtype}")
        bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, :2] < 0).any(axis=1) | \
            (b[:, 2] > spatial[1]) | (b[:, 3] > spatial[0]) | (b != np.round(b)).any(axis=1)
        if bad.any():  # metrics.boxes_to_masks's checks on every row, without building N masks
            raise ValueError(f"boxes must be integers with 0 <= x0 < x1 <= {spatial[1]}, 0 <= y0 < y1 <= {spatial[0]} "
                             f"(input pixels); rows {np.flatnonzero(bad)[:10].tolist()} are not: "
                             f"{b[bad][:3].tolist()}")


def _describe(source: Any) -> Any:
    """What identifies masks or boxes in the store's settings: a callable's name, an array's digest."""
    if source is None:
        return None
    if callable(source):
        described = source.describe() if hasattr(source, "describe") else {}
        return {"callable": _qualname(source), **described}
    found = {"type": _qualname(source), "shape": [int(v) for v in source.shape], "dtype": str(source.dtype)}
    if isinstance(source, np.ndarray):
        found["sha256"] = hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest()
    return found


def _qualname(obj: Any) -> str:
    kind = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', type(obj).__name__)}"
