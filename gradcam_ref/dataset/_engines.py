"""Engines for :func:`gradcam_ref.explain_dataset`: Dask ``distributed`` and Ray Data.

Both run the same units as the local loop, through :meth:`Job.run_unit`: one unit per task
(Dask) or per ``map_batches`` call (Ray, ``batch_size=1`` over a data set of unit numbers, so
batches keep their size), each worker holding one copy of the model and writing its own chunks.
Each yields ``{"unit", "images", "failed"}`` as units finish, and stops handing out units when
the run is asked to stop.

Dask: the job is scattered to every worker once (one model per worker); for a new store the
client is connected before the probe and every worker warms up meanwhile (:func:`warm_up`).
Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers, which made torch CPU
inference 2.3x slower per image; a local cluster made here leaves glibc's default
(docs/scale.md), and a warning names the setting when a given cluster's workers have it.

Ray Data: a callable class for ``map_batches`` with ``compute=ActorPoolStrategy(size=workers)``
(``concurrency=`` is deprecated in Ray 2.60), ``num_gpus`` per actor, and a fraction of a CPU per
actor (``num_cpus``) so that Ray Data's own tasks are never starved: with every CPU taken by
actors, a pipeline can wait forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from gradcam_ref.dataset._job import Job

SLOW_TRIM = 1 << 20
"""Below this ``MALLOC_TRIM_THRESHOLD_`` (bytes) glibc hands memory back to the OS so often that
torch's allocations become page faults (Dask's default is 65536)."""


def _run_unit(job: Job, unit: int) -> dict[str, Any]:
    return job.run_unit(unit)


def _trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def local_cluster(workers: int) -> Any:
    """A Dask ``LocalCluster`` of ``workers`` one-thread processes whose nanny leaves
    ``MALLOC_TRIM_THRESHOLD_`` unset (glibc's default applies, or the value in this environment)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def warm_up(framework: str) -> str:
    """Import what a unit needs beyond the model (the backend, zarr) and run the framework's first
    gradient once, in a worker, before its first unit.

    torch's first ``autograd.grad`` with ``grad_outputs`` imports sympy (through
    ``torch.fx.experimental.symbolic_shapes``): about 1 s of CPU per process, which the first unit
    of every worker would otherwise pay. Nothing of the model is touched. Returns the process id.
    """
    import importlib

    import zarr  # noqa: F401  (the first write would import it)

    if framework in ("torch", "jax"):
        importlib.import_module(f"gradcam_ref.backends.{framework}")
    if framework == "torch":
        import torch

        x = torch.ones(1, requires_grad=True)
        torch.autograd.grad(x * 2.0, [x], grad_outputs=torch.ones(1))
    return str(os.getpid())


class DaskConnection:
    """The client of one run: connects to ``scheduler`` (a Client or an address) or starts a local
    cluster of ``workers``, and starts :func:`warm_up` on every worker at once, so that the workers
    import and warm up while this process checks the arguments, probes the model and makes the store.
    """

    def __init__(self, workers: int, scheduler: Any, framework: str) -> None:
        from distributed import Client

        self.owned: list[Any] = []
        if scheduler is None:
            cluster = local_cluster(workers)
            self.client = Client(cluster)
            self.owned += [self.client, cluster]
        elif isinstance(scheduler, str):
            self.client = Client(scheduler)
            self.owned.append(self.client)
        else:
            self.client = scheduler
        try:
            addresses = list(self.client.nthreads())  # every worker (scheduler_info may list only a few)
            self.warm = [self.client.submit(warm_up, framework, key=f"gradcam-ref-warm-up-{uuid.uuid4().hex[:8]}",
                                            workers=[address], allow_other_workers=False, pure=False)
                         for address in addresses]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for thing in self.owned:
            thing.close()
        self.owned = []


@contextlib.contextmanager
def connect(engine: str, *, workers: int, scheduler: Any, framework: str) -> Iterator[DaskConnection | None]:
    """A :class:`DaskConnection` for ``engine="dask"`` (closed at the end), else None."""
    if engine != "dask":
        yield None
        return
    connection = DaskConnection(workers, scheduler, framework)
    try:
        yield connection
    finally:
        connection.close()


def dask_units(job: Job, pending: list[int], *, workers: int, scheduler: Any, stopper: Any,
               connection: DaskConnection | None = None) -> Iterator[dict[str, Any]]:
    """Run ``pending`` units as Dask tasks on ``connection`` (else on ``scheduler``, a Client or an
    address, or a local cluster of ``workers``)."""
    from distributed import as_completed

    own = connection is None
    if connection is None:
        connection = DaskConnection(workers, scheduler, job.framework)
    client = connection.client
    futures: list[Any] = []
    try:
        trims = {v for v in client.run(_trim_threshold).values() if v is not None}
        low = [v for v in trims if v.isdigit() and int(v) < SLOW_TRIM]
        if low:
            warnings.warn(
                f"the Dask workers run with MALLOC_TRIM_THRESHOLD_={low[0]}, which makes torch CPU inference "
                "much slower (2.3x measured); start them with it unset, or set "
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_ to null (docs/scale.md)",
                RuntimeWarning, stacklevel=3)
        [job_future] = client.scatter([job], broadcast=True, hash=False)
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_run_unit, job_future, unit, key=f"gradcam-ref-unit-{unit}-{run}", pure=False)
                   for unit in pending]
        for future in as_completed(futures):
            yield future.result()
            if stopper.signum is not None:
                break
    finally:
        if futures:
            client.cancel(futures)
        if own:
            connection.close()


class RayUnits:
    """The callable class for Ray Data's ``map_batches``: explains and writes the units of a batch.

    One instance per actor holds one copy of the model (``job``); a batch is ``{"unit": ints}``
    and the result ``{"unit", "images", "failed"}`` (``failed`` as JSON text).
    """

    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.job.run_unit(int(unit)) for unit in batch["unit"]]
        return {"unit": np.array([r["unit"] for r in rows], dtype=np.int64),
                "images": np.array([r["images"] for r in rows], dtype=np.int64),
                "failed": np.array([json.dumps(r["failed"]) for r in rows], dtype=object)}


def ray_units(job: Job, pending: list[int], *, workers: int, address: Any, stopper: Any,
              num_gpus: float = 0.0, cpus_per_actor: float | None = None) -> Iterator[dict[str, Any]]:
    """Run ``pending`` units on Ray Data: ``map_batches(RayUnits, batch_size=1, compute=ActorPoolStrategy)``.

    Uses the running Ray (``ray.init`` already called), else connects to ``address``, else starts a
    local one with ``workers`` actors; a Ray started here is shut down at the end.
    """
    import ray
    from ray.data import ActorPoolStrategy

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else max(2, workers), configure_logging=False)
        started = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        # Leave at least half a CPU for Ray Data's own tasks (reading, splitting, collecting).
        cpus = cpus_per_actor if cpus_per_actor is not None else min(1.0, max(0.1, (total_cpus - 0.5) / workers))
        items = ray.data.from_items([{"unit": unit} for unit in pending], override_num_blocks=max(1, len(pending)))
        results = items.map_batches(RayUnits, fn_constructor_kwargs={"job": job}, batch_size=1,
                                    compute=ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=num_gpus,
                                    batch_format="numpy")
        for row in results.iter_rows():
            yield {"unit": int(row["unit"]), "images": int(row["images"]),
                   "failed": [tuple(x) for x in json.loads(row["failed"])]}
            if stopper.signum is not None:
                break
    finally:
        if started:
            ray.shutdown()
