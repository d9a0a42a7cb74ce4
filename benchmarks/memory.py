"""Peak working memory of each method, each measured in a process of its own.

    python -m benchmarks.memory MODEL BATCH TARGETS METHOD [--threads 2] [--runs 2]

In the measuring process (a fresh fork of a server that has imported torch and the peers but
run nothing):

1. glibc's malloc is told to serve every block of 64 KiB or more with ``mmap`` and to give freed
   memory back (``mallopt``: a fixed mmap threshold, no dynamic raise), so that the resident set
   follows what the tensors hold instead of what the allocator kept from earlier calls;
2. the model is built, the input and the targets made; the method runs once (warm-up: lazy
   imports, kernels' one-time set-up), then its explainer is thrown away and the parameters'
   ``.grad`` cleared; a fresh explainer is built (hooks included) and one no-grad forward pass
   run on the input: every method starts from the state inference leaves;
3. "loaded" = the resident set size now; the kernel's peak counter is reset to it
   (``/proc/self/clear_refs``, ``5``);
4. the method runs ``runs`` times (default 2, so that whatever a library keeps between calls, a
   graph or parameters' ``.grad``, is counted once it is held alongside the next call);
5. "peak" = the peak resident set size (``VmHWM``).

Working memory = peak - loaded. The ratio reported is a method's working memory over the
``forward`` method's, same model, batch and input. Threads: ``torch.set_num_threads(threads)``
in every process.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024
_PRELOAD = ["numpy", "torch", "torchvision", "gradcam_ref", "gradcam_ref.backends.torch",
            "benchmarks.models", "benchmarks.methods", "captum.attr", "pytorch_grad_cam", "torchcam.methods"]


def _fix_malloc() -> bool:
    """Fixed mmap threshold and trim threshold (glibc); False where ``mallopt`` is missing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False


def supported() -> str | None:
    """None where the peak can be measured (Linux: ``/proc/self/status``, ``clear_refs``), else why not."""
    for path in ("/proc/self/status", "/proc/self/clear_refs"):
        if not os.path.exists(path):
            return f"{path} is missing: the memory suite needs Linux's per-process memory counters"
    return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak() -> None:
    """Reset the kernel's peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn: Callable[[], object]) -> tuple[int, int]:
    """``(resident KiB before, peak resident KiB during)`` ``fn()``."""
    gc.collect()
    loaded = _status_kib("VmRSS")
    _reset_peak()
    fn()
    return loaded, _status_kib("VmHWM")


def peak_growth(fn: Callable[[], object]) -> float:
    """MiB by which the resident set's peak during ``fn()`` exceeds the resident set before it."""
    loaded, peak = _measure(fn)
    return (peak - loaded) / 1024


def measure(model_name: str, batch: int, per_image: int, method: str, *, threads: int = 1, runs: int = 2) -> dict:
    """Measure one method in THIS process (call it in a fresh one: see :func:`measure_all`)."""
    start = time.perf_counter()
    malloc_fixed = _fix_malloc()
    import torch

    from benchmarks import methods, models

    torch.set_num_threads(threads)
    model, layer = models.build(model_name)
    x = models.inputs(model_name, batch)
    targets = models.targets(model_name, batch, per_image)
    # Warm-up: one full run, then the explainer is thrown away and the parameters' .grad
    # cleared, so that only one-time costs (lazy imports, kernel set-up) stay in "loaded".
    warm = methods.make(method, model, layer, x, targets)
    warm.call()
    warm.close()
    del warm
    model.zero_grad(set_to_none=True)
    gc.collect()
    built = methods.make(method, model, layer, x, targets)
    with torch.no_grad():
        model(x)

    def run() -> None:
        for _ in range(runs):
            built.call()

    loaded, peak = _measure(run)
    built.close()
    seconds = time.perf_counter() - start
    return {"suite": "memory", "model": model_name, "batch": batch, "targets": per_image, "method": method,
            "library": methods.library(method), "loaded_mib": loaded / 1024, "peak_mib": peak / 1024,
            "working_mib": (peak - loaded) / 1024, "runs": runs, "threads": threads,
            "malloc_fixed": malloc_fixed, "process_s": seconds}


def _child(conn: Any, args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", measure(*args, **kwargs)))
    except BaseException as error:  # report it to the parent, which decides
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def _context() -> Any:
    """A forkserver that imported torch and the peers once: each measurement is a cheap fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in _PRELOAD if importlib.util.find_spec(m.split(".")[0])])
    return ctx


def measure_all(
    configs: Iterable[tuple[str, int, int, str]], *, threads: int = 1, runs: int = 2, timeout_s: float = 300,
    log: Any = None,
) -> list[dict]:
    """Measure each ``(model, batch, targets per image, method)`` in its own process.

    Adds ``ratio`` = working memory / the ``forward`` method's working memory (same model and
    batch) to each row, when that baseline was measured.
    """
    ctx = _context()
    rows = []
    for config in configs:
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(send, config, {"threads": threads, "runs": runs}))
        process.start()
        send.close()
        status, value = ("error", "no result (the process died)")
        if receive.poll(timeout_s):
            try:
                status, value = receive.recv()
            except EOFError:
                pass
        else:
            status, value = ("error", f"timed out after {timeout_s} s")
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        if status != "ok":
            raise RuntimeError(f"memory measurement of {config} failed: {value}")
        rows.append(value)
        if log:
            log([value])
    base = {(r["model"], r["batch"]): r["working_mib"] for r in rows if r["method"] == "forward"}
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        r["ratio"] = r["working_mib"] / b if b else float("nan")
    return rows


def configs_for(
    model_names: Sequence[str], batches: Sequence[int], multi_targets: int, multi_batch: int,
    multi_models: Sequence[str],
) -> list[tuple[str, int, int, str]]:
    """Every installed method at each (model, batch) with 1 target, then T targets per image."""
    from benchmarks import methods

    out = []
    for name in model_names:
        for batch in batches:
            out += [(name, batch, 1, m) for m in methods.ONE_TARGET if methods.available(m)]
    if multi_targets > 1:
        for name in multi_models:
            names = methods.MULTI_TARGET
            if multi_batch in batches and name in model_names:
                names = tuple(m for m in names if m != "forward")  # same baseline as 1 target
            names += methods.MEMORY_ONLY
            out += [(name, multi_batch, multi_targets, m) for m in names if methods.available(m)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("targets", type=int, help="targets per image")
    parser.add_argument("method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    row = measure(args.model, args.batch, args.targets, args.method, threads=args.threads, runs=args.runs)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
