"""Data sets: explain_dataset against a plain no-grad inference loop over the same files, same run.

    python -m benchmarks.bench_dataset [--images 96] [--batch 16] [--rounds 2]
        [--parts local,memory,malloc,dask,ray,metrics]

Every measurement runs in a fresh process (so glibc's malloc settings can be set before it starts
and peak memory is its own), model EfficientNet-Lite0 (ImageNet weights, 224 x 224, explained at
its last convolutional features), one torch thread per process, images decoded by one DataLoader
worker process, batch 16 for every engine. Parts:

- ``local``: images/s of explain_dataset (writing the zarr store) over images/s of a plain loop
  (the same DataLoader decoding the same files, ``model(x)`` under ``torch.no_grad()``), rounds
  alternating; and explain_dataset's startup (call to first unit: checks, probe, store);
- ``memory``: peak resident memory of explain_dataset on N and on 10 N images (tiny model);
- ``malloc``: the plain loop with glibc's defaults, with Dask's ``MALLOC_TRIM_THRESHOLD_=65536``,
  and with the settings docs/scale.md recommends;
- ``split``: one unit's CPU seconds, step by step, in one process (what an engine's worker does
  per unit): read and decode, no-grad forward, explain, write;
- ``dask`` / ``ray``: explain_dataset on the engine over the same engine running inference
  only (same units: read and decode the same files in the workers, ``model(x)`` under no-grad;
  nothing written), and 2 workers over 1 worker; each on half of the images and on all of them,
  giving the end-to-end rate (start-up included) and the marginal rate (start-up excluded: what
  a large data set sees), and the CPU seconds per image of the driver, the engine's workers and
  the rest of the process tree (Ray's raylet, ...).
- ``metrics``: explain_dataset scoring the localisation metrics in the same pass (a box per
  image, maps upsampled to 224 x 224) over explain_dataset alone.

Absolute figures depend on the machine (and on a shared machine, on its load): the ratios are
what the goals are about.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report

RECOMMENDED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                      "MALLOC_TOP_PAD_": str(256 << 20)}
"""glibc settings measured here (docs/scale.md): big blocks from the heap, kept, grown in large steps."""
DASK_TRIM = {"MALLOC_TRIM_THRESHOLD_": "65536"}
PARTS = ("local", "memory", "malloc", "split", "dask", "ray", "metrics")
LOCALISATION = ("pointing_game", "relevance_mass", "relevance_rank", "localisation_auc",
                "weakly_supervised_localisation")


def _row(what: str, ratio: float, detail: str, batch: int, **extra: Any) -> dict[str, Any]:
    """A row of the benchmark report (``suite`` "dataset")."""
    return {"suite": "dataset", "method": "explain_dataset", "model": "efficientnet_lite0", "batch": batch,
            "targets": 1, "what": what, "ratio": ratio, "detail": detail, **extra}


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct photo-sized JPEGs (noise over smooth colour fields), as the files a data set has."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 300 + 7 * (i % 9), 400 + 5 * (i % 11)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(x / (20 + i) + c) * np.cos(y / (30 + c)) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


# --- what runs in each child process ------------------------------------------------------------


def _model(name: str) -> tuple[Any, Any]:
    """(model, layer) as the command line loads them."""
    if name == "efficientnet-lite0":
        from gradcam_ref.cli import _torch

        loaded = _torch.load("efficientnet-lite0")
        return loaded.explained, loaded.layer
    from tests.dataset.helpers import tiny_model

    return tiny_model(), "2"


class _Files:
    """A map-style data set of preprocessed images for the plain loop."""

    def __init__(self, paths: list[str], size: int) -> None:
        from gradcam_ref.dataset import Preprocess

        self.paths, self.load = paths, Preprocess((size, size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        return self.load(self.paths[i])


def _forward(model: Any, x: Any) -> Any:
    return model[1](model[0](x)) if isinstance(model, (tuple, list)) else model(x)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    paths = Path(args.list).read_text().split()
    model, layer = _model(args.model)
    size = 224 if args.model == "efficientnet-lite0" else 64
    if args.mode == "loop":
        from torch.utils.data import DataLoader

        loader = DataLoader(_Files(paths, size), batch_size=args.batch, num_workers=1)
        start = time.perf_counter()
        with torch.no_grad():
            for x in loader:
                _forward(model, x)
        seconds = time.perf_counter() - start
        return {"images_per_s": len(paths) / seconds, "seconds": seconds}
    import gradcam_ref

    if args.mode in ("dataset", "dataset-scored"):
        out = Path(tempfile.mkdtemp()) / "maps.zarr"
        scoring: dict[str, Any] = {}
        if args.mode == "dataset-scored":  # localisation in the same pass: a centred box per image
            import numpy as np

            scoring = {"metrics": LOCALISATION, "boxes": np.tile([size // 4, size // 4, 3 * size // 4, 3 * size // 4],
                                                                 (len(paths), 1))}
        try:
            summary = gradcam_ref.explain_dataset(model, paths, layer=layer, out=out, batch_size=args.batch,
                                                  size=size, num_workers=1, threads=1, progress=False, **scoring)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"images_per_s": summary.images_per_second, "seconds": summary.seconds,
                "startup_s": summary.startup_seconds, "peak_mib": own}
    if args.mode == "split":
        return split_child(model, layer, paths, size, args.batch)
    return engine_child(args, model, layer, paths, size)


def split_child(model: Any, layer: Any, paths: list[str], size: int, batch_size: int) -> dict[str, Any]:
    """CPU seconds (``time.process_time``) per unit of each step a worker runs, medians over the
    units after the first two (warm-up); the explained unit is written to a real store."""
    import statistics

    import torch

    import gradcam_ref
    from gradcam_ref.dataset import Preprocess, _job

    work = Path(tempfile.mkdtemp())
    try:
        out = work / "maps.zarr"
        gradcam_ref.explain_dataset(model, paths[:batch_size], layer=layer, out=out, batch_size=batch_size,
                                    size=size, num_workers=0, threads=1, progress=False)
        job = _job.Job(model=model, paths=paths, out=str(out), batch_size=batch_size, layer=layer, target=None,
                       method="grad-cam", options={}, load=Preprocess((size, size)), on_error="record",
                       device=None, threads=1, evaluate=None, dtype=None, framework="torch")
        job.input_shape = (3, size, size)
        steps: dict[str, list[float]] = {"read": [], "forward_no_grad": [], "explain": [], "write": []}

        def timed(step: str, f: Any, *args: Any) -> Any:
            before = time.process_time()
            result = f(*args)
            steps[step].append(time.process_time() - before)
            return result

        def forward(batch: Any) -> None:
            with torch.no_grad():
                _forward(model, torch.from_numpy(batch))

        for unit in range(job.n_units):
            batch, errors = timed("read", job.read, unit)
            timed("forward_no_grad", forward, batch)
            arrays = timed("explain", job.outputs, batch, errors)
            timed("write", job.write, 0, arrays)  # into chunk 0, rewritten each time
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {step: statistics.median(values[2:]) for step, values in steps.items()}


def _infer_unit(job: Any, unit: int) -> int:
    import torch

    batch, errors = job.read(unit)
    with torch.no_grad():
        _forward(job.prepared_model(), torch.from_numpy(batch))
    return len(errors)


class _RayInfer:
    def __init__(self, job: Any) -> None:
        self.job = job

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return {"images": np.array([_infer_unit(self.job, int(u)) for u in batch["unit"]])}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process ("driver"), of the engine's worker processes (Dask's
    spawned workers, Ray's worker and actor processes) and of the rest of its process tree (Ray's
    raylet, GCS, ...), to see who uses the cores during a run."""
    import psutil

    me = psutil.Process()
    split = {"driver": sum(me.cpu_times()[:2]), "workers": 0.0, "system": 0.0}
    for child in me.children(recursive=True):
        try:
            line = " ".join(child.cmdline())
            used = sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        worker = "spawn_main" in line or "default_worker" in line or child.name().startswith("ray::")
        split["workers" if worker else "system"] += used
    return split


def engine_child(args: argparse.Namespace, model: Any, layer: Any, paths: list[str], size: int) -> dict[str, Any]:
    import gradcam_ref
    from gradcam_ref.dataset import Preprocess, _engines, _job

    job = _job.Job(model=model, paths=paths, out="unused", batch_size=args.batch, layer=layer, target=None,
                   method="grad-cam", options={}, load=Preprocess((size, size)), on_error="record", device=None,
                   threads=1, evaluate=None, dtype=None, framework="torch")
    units = list(range(job.n_units))
    out = Path(tempfile.mkdtemp()) / "maps.zarr"
    engine, what = args.mode.split("-")
    try:
        if engine == "dask":
            from distributed import Client

            cluster = _engines.local_cluster(args.workers)
            client = Client(cluster)
            client.run(lambda: __import__("torch"))  # imports before the clock, for both
            cpu = cpu_seconds()
            start = time.perf_counter()
            if what == "infer":
                [scattered] = client.scatter([job], broadcast=True, hash=False)
                client.gather([client.submit(_infer_unit, scattered, u, pure=False) for u in units])
            else:
                gradcam_ref.explain_dataset(model, paths, layer=layer, out=out, batch_size=args.batch, size=size,
                                            threads=1, engine="dask", scheduler=client, progress=False)
            seconds = time.perf_counter() - start
            cpu = {k: v - cpu[k] for k, v in cpu_seconds().items()}
            client.close()
            cluster.close()
        else:
            import ray
            from ray.data import ActorPoolStrategy

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            cpu = cpu_seconds()
            start = time.perf_counter()
            if what == "infer":
                items = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
                cpus = min(1.0, (2 - 0.5) / args.workers)
                items.map_batches(_RayInfer, fn_constructor_kwargs={"job": job}, batch_size=1, num_cpus=cpus,
                                  compute=ActorPoolStrategy(size=args.workers)).take_all()
            else:
                gradcam_ref.explain_dataset(model, paths, layer=layer, out=out, batch_size=args.batch, size=size,
                                            threads=1, engine="ray", workers=args.workers, progress=False)
            seconds = time.perf_counter() - start
            cpu = {k: v - cpu.get(k, 0.0) for k, v in cpu_seconds().items()}
            ray.shutdown()
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"images_per_s": len(paths) / seconds, "seconds": seconds, "cpu_s": cpu}


# --- the parent: start children, pair rounds ----------------------------------------------------


def run_child(mode: str, listing: Path, batch: int, model: str = "efficientnet-lite0", env: dict | None = None,
              workers: int = 1) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **(env or {})}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if env is None or key not in env:
            environ.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_dataset", "--child", mode, "--list", str(listing),
                           "--batch", str(batch), "--model", model, "--workers", str(workers)],
                          capture_output=True, text=True, env=environ, cwd=root, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{mode} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _times(ratio: float | None) -> str:
    return "n/a (the larger run was not the longer one: load)" if ratio is None else f"{ratio:.2f}x"


def engine_rows(engine: str, paths: list[str], work: Path, batch: int, rounds: int, log: Any) -> list[dict[str, Any]]:
    """explain_dataset on ``engine`` against the same engine running inference only, 1 and 2 workers.

    Each configuration runs on the first half of the images and on all of them, in fresh processes:
    the end-to-end rate (all images, start-up included: cluster connection, probe, store, actor or
    worker start, first units) and the marginal rate, ``half / (T(all) - T(half))``, what a data set
    many times larger sees, with the fixed cost ``2 T(half) - T(all)`` beside it. Rounds alternate
    explain and inference; the medians of the rounds' ratios are reported.
    """
    half = len(paths) // 2
    lists = {}
    for n in (half, len(paths)):
        lists[n] = work / f"{engine}-{n}.txt"
        lists[n].write_text("\n".join(paths[:n]) + "\n")
    measured: dict[tuple[int, str], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for workers in (1, 2):
            for what in ("infer", "explain"):
                got = {n: run_child(f"{engine}-{what}", lists[n], batch, workers=workers) for n in lists}
                t = {n: r["seconds"] for n, r in got.items()}
                cpu = {k: v / len(paths) for k, v in got[len(paths)]["cpu_s"].items()}
                measured.setdefault((workers, what), []).append({"cpu": cpu,
                    "end_to_end": len(paths) / t[len(paths)],
                    # T(all) <= T(half) happens only when the load swamps the run: no rate then
                    "marginal": (len(paths) - half) / (t[len(paths)] - t[half]) if t[len(paths)] > t[half] else None,
                    "fixed_s": 2 * t[half] - t[len(paths)], "load": os.getloadavg()[0]})
    rows = []
    for kind in ("end_to_end", "marginal"):
        def ratio(a: tuple[int, str], b: tuple[int, str], kind: str = kind) -> tuple[float | None, list[float]]:
            each = [x[kind] / y[kind] for x, y in zip(measured[a], measured[b], strict=True)
                    if x[kind] is not None and y[kind] is not None]
            return (statistics.median(each) if each else None), [round(r, 2) for r in each]

        def rate(key: tuple[int, str], kind: str = kind) -> float:
            valid = [x[kind] for x in measured[key] if x[kind] is not None]
            return statistics.median(valid) if valid else float("nan")

        label = (f"{len(paths)} images, start-up included" if kind == "end_to_end"
                 else f"marginal: {len(paths) - half} more images over {half}, start-up excluded")
        fixed = {k: statistics.median(x["fixed_s"] for x in v) for k, v in measured.items()}
        cpu = {f"{w} worker{'s' * (w > 1)}, {what}": {k: round(statistics.median(x["cpu"][k] for x in v), 3)
                                                     for k in v[0]["cpu"]}
               for (w, what), v in measured.items()}
        loads = sorted({round(x["load"], 1) for v in measured.values() for x in v})
        value, each = ratio((2, "explain"), (2, "infer"))
        rows.append(_row(f"{engine}: explain_dataset / inference only, 2 workers ({label})", value,
                         f"{rate((2, 'explain')):.1f} vs {rate((2, 'infer')):.1f} images/s; rounds {each}; "
                         f"fixed cost {fixed[(2, 'explain')]:.1f} vs {fixed[(2, 'infer')]:.1f} s; "
                         f"load {loads[0]}-{loads[-1]}", batch, kind=kind, cpu_s_per_image=cpu))
        log(rows[-1])
        value, each = ratio((2, "explain"), (1, "explain"))
        infer, _ = ratio((2, "infer"), (1, "infer"))
        rows.append(_row(f"{engine}: explain_dataset, 2 workers / 1 worker ({label})", value,
                         f"{rate((2, 'explain')):.1f} vs {rate((1, 'explain')):.1f} images/s; rounds {each}; "
                         f"inference only {_times(infer)}; fixed cost {fixed[(2, 'explain')]:.1f} vs "
                         f"{fixed[(1, 'explain')]:.1f} s; load {loads[0]}-{loads[-1]}", batch, kind=kind))
        log(rows[-1])
    return rows


def _paired(ours: str, base: str, listing: Path, batch: int,
            rounds: int) -> tuple[list[float], list[dict[str, Any]], list[dict[str, Any]]]:
    """``rounds`` alternating runs of the children ``base`` then ``ours``: the ratios of their images/s
    (ours / base) and each child's results."""
    ratios, mine, theirs = [], [], []
    for _ in range(rounds):
        theirs.append(run_child(base, listing, batch))
        mine.append(run_child(ours, listing, batch))
        ratios.append(mine[-1]["images_per_s"] / theirs[-1]["images_per_s"])
    return ratios, mine, theirs


def _speeds(ours: list[dict[str, Any]], base: list[dict[str, Any]]) -> str:
    """The medians of both sides' images/s, as the rows print them."""
    return (f"{statistics.median(r['images_per_s'] for r in ours):.1f} vs "
            f"{statistics.median(r['images_per_s'] for r in base):.1f} images/s")


def run(parts: tuple[str, ...], images: int, batch: int, rounds: int, log: Any = print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    try:
        paths = make_images(work / "images", images)
        listing = work / "list.txt"
        listing.write_text("\n".join(paths) + "\n")
        if "local" in parts:
            ratios, ours, base = _paired("dataset", "loop", listing, batch, rounds)
            startup = statistics.median(r["startup_s"] for r in ours)
            rows.append(_row("local: explain_dataset / no-grad loop, images/s", statistics.median(ratios),
                             f"{_speeds(ours, base)}, {images} images; startup {startup:.2f} s; rounds {ratios}",
                             batch, startup_s=startup))
            log(rows[-1])
        if "metrics" in parts:
            ratios, ours, base = _paired("dataset-scored", "dataset", listing, batch, rounds)
            rows.append(_row("explain_dataset scoring the 5 localisation metrics in the same pass / not scoring",
                             statistics.median(ratios), f"{_speeds(ours, base)}, {images} images; rounds {ratios}",
                             batch))
            log(rows[-1])
        if "memory" in parts:
            small = work / "small.txt"
            big = work / "big.txt"
            tiny = paths[:32]
            small.write_text("\n".join(tiny * 2) + "\n")
            big.write_text("\n".join(tiny * 20) + "\n")
            a = run_child("dataset", small, batch, model="tiny")
            b = run_child("dataset", big, batch, model="tiny")
            rows.append(_row("peak memory, 640 images / 64 images", b["peak_mib"] / a["peak_mib"],
                             f"{a['peak_mib']:.0f} vs {b['peak_mib']:.0f} MiB (tiny model, 64 x 64)", batch))
            log(rows[-1])
        if "malloc" in parts:
            for name, env in (("Dask's MALLOC_TRIM_THRESHOLD_=65536", DASK_TRIM),
                              ("docs/scale.md settings", RECOMMENDED_MALLOC)):
                ratios = []
                for _ in range(rounds):
                    plain = run_child("loop", listing, batch)
                    tuned = run_child("loop", listing, batch, env=env)
                    ratios.append(tuned["images_per_s"] / plain["images_per_s"])
                rows.append(_row(f"no-grad loop with {name} / glibc defaults, images/s", statistics.median(ratios),
                                 f"rounds {[round(r, 2) for r in ratios]}; {env}", batch))
                log(rows[-1])
        if "split" in parts:
            split = run_child("split", listing, batch)
            unit_explain = split["read"] + split["explain"] + split["write"]
            unit_infer = split["read"] + split["forward_no_grad"]
            rows.append(_row("one unit in a worker: CPU s explain (read, explain, write) / inference only "
                             "(read, no-grad forward)", unit_explain / unit_infer,
                             ", ".join(f"{k} {v:.3f} s" for k, v in split.items()) + f"; {images} images, "
                             f"load {os.getloadavg()[0]:.1f}", batch, cpu_s_per_unit=split))
            log(rows[-1])
        for engine in ("dask", "ray"):
            if engine in parts:
                rows += engine_rows(engine, paths, work, batch, rounds, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", metavar="FILE", type=report.writable)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="efficientnet-lite0", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return 0
    rows = run(tuple(args.parts.split(",")), args.images, args.batch, args.rounds,
               log=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    if args.json:
        report.save(args.json, {"load_average": os.getloadavg(), "rows": rows})
    for row in rows:
        print(f"{row['what']}: {_times(row['ratio'])} ({row['detail']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
