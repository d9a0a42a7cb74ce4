"""``make bench``: every benchmark in one run, as ratios against a baseline of the same run.

    python -m benchmarks.run [--quick] [--json FILE] [--threads N] [--suites time,memory,core,jax]

Suites (all by default):

- ``time``: one explanation against a no-grad forward pass of the same model, batch and input
  (ResNet-18, ResNet-50, EfficientNet-Lite0; batch 1 and 8; 1 target, then 10 targets for one
  image), our torch backend and every installed peer, plus the peers' setup cost;
- ``memory``: peak working memory of each method, each in its own process;
- ``core``: the Grad-CAM math alone against a streaming pass over the same arrays;
- ``overhead``: the fixed cost of one explanation (torch and JAX), on a model that is all head;
- ``jax``: jitted explain against the jitted forward of the same model (when the JAX backend
  and JAX are installed);
- ``gain``: one GAIN training step (``explain(differentiable="stop" | "full")``, Eq. 3-6)
  against one plain training step of ResNet-18 (:mod:`benchmarks.bench_gain`).
- ``metrics``: gradcam_ref.metrics against Quantus 0.6 in the same run (localisation per map,
  perturbation metrics per forward, ROAD's imputation), when Quantus is installed.
- ``family``: each CAM method of ours and of pytorch-grad-cam (ResNet-18 layer4, batch 1)
  against a no-grad forward (:mod:`benchmarks.bench_family`).
- ``tensorflow``: the TensorFlow backend against a compiled no-grad forward of EfficientNet-Lite0
  in Keras, tf-keras-vis and xplique beside, time and memory, in its own interpreter
  (``benchmarks/bench_tensorflow.py``).
- ``dataset``: explain_dataset against a plain no-grad loop over the same files, on one machine,
  Dask and Ray (``benchmarks/bench_dataset.py``).

``--quick`` (under 2 minutes): ResNet-18 only, fewer rounds, memory at batch 8 only.
Every figure is a median of per-round ratios; absolute times are for orientation only.

THREADS: one by default. On a machine whose cores are shared with other work, two OpenMP threads
spend most of their time waiting for each other at barriers (a ResNet-18 forward pass measured
0.1-1.9 s with 2 threads against 0.043-0.068 s with 1, same minute, same machine), which drowns
every ratio in scheduler noise. ``--threads 2`` (or more) for a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from typing import Any

from benchmarks import report

SUITES = ("time", "memory", "core", "overhead", "jax", "gain", "metrics", "family", "tensorflow", "dataset")

# name -> settings of each mode
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "models": ("resnet18", "resnet50", "efficientnet_lite0"), "batches": (1, 8), "multi_targets": 10,
        "budget_s": 18.0, "multi_budget_s": 30.0, "max_rounds": 30, "min_rounds": 7, "costly_min_rounds": 3,
        "setup_rounds": 5, "memory_batches": (8,), "memory_multi_models": ("resnet50",),
        "core_rounds": 40, "overhead_rounds": 30, "jax_rounds": 20,
        "family_budget_s": 60.0, "family_max_rounds": 15, "family_min_rounds": 5, "family_costly_min_rounds": 3,
        "tensorflow_quick": False,
    },
    "quick": {
        "models": ("resnet18",), "batches": (1, 8), "multi_targets": 10,
        "budget_s": 4.0, "multi_budget_s": 5.0, "max_rounds": 15, "min_rounds": 5, "costly_min_rounds": 2,
        "setup_rounds": 3, "memory_batches": (8,), "memory_multi_models": (),
        "core_rounds": 10, "overhead_rounds": 10, "jax_rounds": 5,
        "family_budget_s": 10.0, "family_max_rounds": 5, "family_min_rounds": 3, "family_costly_min_rounds": 1,
        "tensorflow_quick": True,
    },
}


def set_threads(threads: int) -> None:
    """Fix the threads of OpenMP (torch), OpenBLAS and MKL (NumPy) before they are imported.

    Also inherited by the memory suite's processes.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:  # XLA's CPU client: one thread for Eigen's ops (else it uses every core)
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = flags.strip()


def machine(threads: int) -> dict:
    import numpy as np

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "numpy": np.__version__, "threads": threads,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    for name in ("torchvision", "captum", "pytorch_grad_cam", "torchcam", "jax"):
        try:
            from importlib.metadata import version

            dist = {"pytorch_grad_cam": "grad-cam"}.get(name, name)
            info[name] = version(dist)
        except Exception:  # not installed
            pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(quick: bool = False, threads: int = 1, suites: tuple[str, ...] = SUITES, log: Any = None) -> dict:
    """Run the chosen suites; return ``{"machine", "plan", "rows", "elapsed_s", "notes"}``."""
    plan = PLANS["quick" if quick else "full"]
    start = time.perf_counter()
    rows: list[dict] = []
    notes: list[str] = []
    why: str | None = None
    torch_ok = _has("torch")
    if torch_ok:
        import torch

        torch.set_num_threads(threads)
    info = machine(threads)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(suite: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[suite] = now - clock
        clock = now

    if "time" in suites and torch_ok:
        from benchmarks import bench_torch

        rows += bench_torch.run(plan["models"], plan["batches"], plan["multi_targets"], 1,
                                budget_s=plan["budget_s"], multi_budget_s=plan["multi_budget_s"],
                                max_rounds=plan["max_rounds"], min_rounds=plan["min_rounds"],
                                costly_min_rounds=plan["costly_min_rounds"], setup_rounds=plan["setup_rounds"],
                                log=log)
        lap("time")
    if "memory" in suites and torch_ok:
        from benchmarks import memory

        why = memory.supported()
        if why:
            notes.append(f"memory suite not run: {why}")
    if "memory" in suites and torch_ok and not why:
        configs = memory.configs_for(plan["models"], plan["memory_batches"], plan["multi_targets"], 1,
                                     plan["memory_multi_models"])
        rows += memory.measure_all(configs, threads=threads, log=log)
        lap("memory")
    if "core" in suites:
        from benchmarks import bench_core

        new = bench_core.run(quick=quick, rounds=plan["core_rounds"])
        rows += new
        if log:
            log(new)
        lap("core")
    if "overhead" in suites:
        from benchmarks import bench_overhead

        new = bench_overhead.run(rounds=plan["overhead_rounds"])
        rows += new
        if log:
            log(new)
        lap("overhead")
    if "jax" in suites:
        try:
            from benchmarks import bench_jax
        except ImportError as error:
            notes.append(f"jax suite not run: {error}")
        else:
            reason = bench_jax.why_unavailable()
            if reason is None:
                new = bench_jax.run(quick=quick, rounds=plan["jax_rounds"])
                if _has("flax"):  # the same network as a Flax linen module, at layer=
                    new += bench_jax.run_named(quick=quick, rounds=plan["jax_rounds"])
                rows += new
                if log:
                    log(new)
                lap("jax")
            else:
                notes.append(f"jax suite not run: {reason}")
    if "gain" in suites and torch_ok and _has("torchvision"):
        from benchmarks import bench_gain

        new = bench_gain.run(rounds=3 if quick else 10, batch=8)
        rows += new
        if log:
            log(new)
        lap("gain")
    if "metrics" in suites:
        if torch_ok and _has("quantus"):
            import torchvision  # noqa: F401  (before quantus, which imports tensorflow: the other order segfaults)

            from benchmarks import bench_metrics

            new = bench_metrics.run(quick=quick)
            rows += new
            lap("metrics")
        else:
            notes.append("metrics suite not run: it needs torch and quantus (pip install -e '.[metrics-peers]')")
    if "family" in suites and torch_ok:
        from benchmarks import bench_family

        new = bench_family.run(budget_s=plan["family_budget_s"], max_rounds=plan["family_max_rounds"],
                               min_rounds=plan["family_min_rounds"],
                               costly_min_rounds=plan["family_costly_min_rounds"], peers=_has("pytorch_grad_cam"))
        rows += new
        if log:
            log(new)
        lap("family")
    if "tensorflow" in suites:
        from benchmarks import bench_tensorflow

        new, more = bench_tensorflow.run_isolated(quick=plan["tensorflow_quick"], threads=threads)
        rows += new
        notes += more
        if log and new:
            log(new)
        if new:
            lap("tensorflow")
    if "dataset" in suites and torch_ok:
        from benchmarks import bench_dataset

        parts = ("local", "memory") if quick else bench_dataset.PARTS
        new = bench_dataset.run(parts, images=32 if quick else 96, batch=16, rounds=1 if quick else 2)
        rows += new
        if log:
            log(new)
        lap("dataset")
    if not torch_ok:
        notes.append("torch is not installed: time, memory and family suites not run")
    return {"machine": info, "plan": {"mode": "quick" if quick else "full", **plan}, "rows": rows,
            "elapsed_s": time.perf_counter() - start, "suite_seconds": seconds, "notes": notes}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer models and rounds (under 2 minutes)")
    parser.add_argument("--json", metavar="FILE", type=report.writable,
                        help="write the machine, the plan and the rows as JSON to FILE")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of torch and BLAS in every process (1: see THREADS below)")
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {SUITES}")
    args = parser.parse_args(argv)
    suites = tuple(s for s in args.suites.split(",") if s)
    unknown = set(suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    set_threads(args.threads)
    warnings.filterwarnings("ignore")  # peers' deprecation chatter would bury the figures

    def log(rows: list[dict]) -> None:
        for line in report.progress_lines(rows):
            print(line, file=sys.stderr, flush=True)

    result = run(quick=args.quick, threads=args.threads, suites=suites, log=log)
    print(f"machine: {result['machine']}")
    print(report.markdown(result))
    laps = ", ".join(f"{k} {v:.0f} s" for k, v in result["suite_seconds"].items())
    print(f"elapsed: {result['elapsed_s']:.0f} s ({laps})")
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        report.save(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
