"""Smoke test of the benchmark harness (``benchmarks/``) on tiny inputs: fast, and it can fail.

The figures themselves come from ``make bench``; here the machinery is checked: paired ratios
see equal work as ~1 and more work as > 1, rows have the documented structure, the peak-memory
probe sees an allocation, the compared core formulations compute the same map, and the peers are
called on the same layer and targets as ours (same maps).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradcam_ref
from benchmarks import bench_core, bench_jax, bench_overhead, bench_torch, memory, methods, models, report
from benchmarks.timing import paired_ratios, tiered_ratios


def _work(n: int):
    data = np.arange(n, dtype=np.float64)
    return lambda: float(np.sqrt(data).sum())


def test_paired_ratios_same_work_is_one_more_work_is_more():
    base = _work(200_000)
    results = paired_ratios(
        {"base": base, "same": _work(200_000), "four times": _work(800_000)}, "base", rounds=15, inner=3
    )
    assert results["base"]["ratio"] == 1.0
    assert 0.75 < results["same"]["ratio"] < 1.33
    assert results["four times"]["ratio"] > 2.0
    for r in results.values():
        assert r["q1"] <= r["ratio"] <= r["q3"] and r["seconds"] > 0 and r["rounds"] == 15


def test_paired_ratios_refuses_an_unknown_baseline():
    with pytest.raises(ValueError, match="baseline 'nope'"):
        paired_ratios({"a": _work(10)}, "nope", rounds=1)


def test_tiered_ratios_gives_costly_methods_their_own_shorter_series():
    results = tiered_ratios(
        {"base": _work(100_000), "same": _work(100_000), "costly": _work(2_000_000)}, "base",
        budget_s=0.0, min_rounds=6, costly_min_rounds=3,
    )
    assert results["same"]["rounds"] == 6 and results["costly"]["rounds"] == 3
    assert results["costly"]["ratio"] > 4.0


# pytorch-grad-cam is left out of the smoke test: importing it alone takes ~5 s here (it imports
# OpenCV, scikit-learn and ttach); `make bench-quick` runs it.
ONE = [m for m in methods.ONE_TARGET if methods.library(m) != "pytorch-grad-cam"]
MULTI = [m for m in methods.MULTI_TARGET if methods.library(m) != "pytorch-grad-cam"]


def test_time_rows_of_a_tiny_model():
    model, layer = models.build("tiny")
    rows = bench_torch.time_config("tiny", model, layer, 2, 1, budget_s=0.0, max_rounds=2, min_rounds=2,
                                   costly_min_rounds=1, names=ONE)
    rows += bench_torch.time_config("tiny", model, layer, 1, 3, budget_s=0.0, max_rounds=2, min_rounds=2,
                                    costly_min_rounds=1, names=MULTI)
    one = [r["method"] for r in rows if r["targets"] == 1]
    multi = [r["method"] for r in rows if r["targets"] == 3]
    assert one == [m for m in ONE if methods.available(m)]
    assert multi == [m for m in MULTI if methods.available(m)]
    assert {"forward", "gradcam_ref"} <= set(one) & set(multi)
    for r in rows:
        assert r["suite"] == "time" and r["model"] == "tiny"
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["seconds"] > 0
        assert r["library"] == r["method"].split(":")[0]
    assert all(r["ratio"] == 1.0 for r in rows if r["method"] == "forward")
    assert not any(m._forward_hooks for m in model.modules())  # nothing left on the shared model
    table = report.time_table(rows, 3)
    assert "gradcam_ref" in table and "tiny b1" in table


def test_peers_explain_the_same_layer_and_targets_as_ours():
    model, layer = models.build("tiny")
    x = models.inputs("tiny", 3)
    targets = models.targets("tiny", 3, 1)
    ours = gradcam_ref.explain(model, x, targets, layer=layer).maps
    if methods.available("captum"):
        captum = methods.make("captum", model, layer, x, targets).call()
        torch.testing.assert_close(torch.relu(captum[:, 0]), ours, rtol=1e-5, atol=1e-6)
    if methods.available("torchcam"):
        method = methods.make("torchcam", model, layer, x, targets)
        (cam,) = method.call()
        method.close()
        lo = ours.flatten(1).amin(1)[:, None, None]
        hi = ours.flatten(1).amax(1)[:, None, None]
        torch.testing.assert_close(cam, (ours - lo) / (hi - lo + 1e-8), rtol=1e-5, atol=1e-6)


def test_multi_target_peers_give_one_map_per_target():
    model, layer = models.build("tiny")
    x = models.inputs("tiny", 1)
    targets = models.targets("tiny", 1, 3)
    assert targets.shape == (1, 3) and len(set(targets[0].tolist())) == 3
    ours = gradcam_ref.explain(model, x, targets, layer=layer).maps  # (1, 3, h, w)
    if methods.available("captum"):
        per_call = methods.make("captum: T calls", model, layer, x, targets).call()
        copies = methods.make("captum: batch of copies", model, layer, x, targets).call()
        for t in range(3):
            torch.testing.assert_close(torch.relu(per_call[t][0, 0]), ours[0, t], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.relu(copies[t, 0]), ours[0, t], rtol=1e-5, atol=1e-6)


def test_core_formulations_compute_the_same_map():
    rng = np.random.default_rng(0)
    for g_shape in [(2, 5, 3, 4), (2, 4, 5, 3, 4)]:
        a, g = rng.random((2, 5, 3, 4)), rng.standard_normal(g_shape)
        compared = bench_core._numpy_methods(a, g)
        want = gradcam_ref.grad_cam(a, g)
        for name, fn in compared.items():
            if not name.startswith("streaming"):
                np.testing.assert_allclose(fn(), want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_core_rows():
    rows = bench_core.run(rounds=2, inner=1, shapes={"small": ((2, 8, 3, 3), None), "small x 2": ((1, 8, 3, 3), 2)})
    assert {r["library"] for r in rows} >= {"numpy", "torch"}
    baselines = [r for r in rows if r["method"].startswith("streaming")]
    assert len(baselines) == 6 and all(r["ratio"] == 1.0 for r in baselines)
    assert {r["shape"] for r in rows} == {"small", "small x 2"}


def test_peak_growth_sees_an_allocation():
    # In a fresh process, as the memory suite measures: in this one, objects of earlier tests
    # (JAX buffers are freed on XLA's own threads) may give memory back during the measurement.
    code = (
        "import numpy as np\n"
        "from benchmarks import memory\n"
        "size = 64 * 2**20\n"
        "print(memory.peak_growth(lambda: np.ones(size // 8).sum()), memory.peak_growth(lambda: None))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    grown, idle = (float(v) for v in out.stdout.split())
    assert 0.9 * 64 <= grown < 1.5 * 64
    assert idle < 0.25 * 64


def test_memory_configs_measure_the_baseline_once_per_batch():
    configs = memory.configs_for(["tiny"], [8], 10, 1, ["tiny"])
    assert ("tiny", 8, 1, "forward") in configs and ("tiny", 1, 10, "forward") in configs
    assert len(configs) == len(set(configs))
    same_batch = memory.configs_for(["tiny"], [1], 10, 1, ["tiny"])
    assert [c for c in same_batch if c[3] == "forward"] == [("tiny", 1, 1, "forward")]


def test_jax_rows_of_a_tiny_model():
    import jax  # part of `make test`: never skipped
    jnp = jax.numpy
    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))

    def features(x):
        return jnp.tanh(x)  # (N, 4, 6, 6)

    def head(a):
        return a.mean(axis=(2, 3)) @ w

    rows = bench_jax.run(rounds=3, configs=[(2, 1), (1, 3)], model=(features, head), image_shape=(4, 6, 6),
                         classes=5, name="tiny")
    assert [(r["batch"], r["targets"], r["method"]) for r in rows] == [
        (2, 1, bench_jax.FORWARD), (2, 1, bench_jax.EXPLAIN), (1, 3, bench_jax.FORWARD), (1, 3, bench_jax.EXPLAIN)]
    for r in rows:
        assert r["suite"] == "jax" and r["model"] == "tiny" and r["compile_s"] >= 0 and r["seconds"] > 0
        assert r["ratio"] == 1.0 if r["method"] == bench_jax.FORWARD else r["ratio"] > 0


def test_overhead_rows():
    rows = bench_overhead.run_torch(rounds=2, inner=1)
    assert [(r["targets"], r["method"]) for r in rows] == [
        (1, "forward"), (1, "gradcam_ref.explain"), (10, "forward"), (10, "gradcam_ref.explain")]
    for r in rows:
        assert r["suite"] == "overhead" and r["library"] == "torch" and r["seconds"] > 0
        assert r["extra_ms"] == 0.0 if r["method"] == "forward" else r["extra_ms"] > 0
    assert "gradcam_ref.explain" in report.overhead_table(rows)


@pytest.mark.slow
def test_dataset_benchmark_measures_peak_memory_and_throughput_in_fresh_processes(tmp_path):
    """bench_dataset's children run explain_dataset and the plain loop on real files (tiny model)."""
    pytest.importorskip("zarr")
    from benchmarks import bench_dataset

    paths = bench_dataset.make_images(tmp_path / "images", 8)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths * 2) + "\n")
    ours = bench_dataset.run_child("dataset", listing, 4, model="tiny")
    loop = bench_dataset.run_child("loop", listing, 4, model="tiny")
    assert ours["images_per_s"] > 0 and loop["images_per_s"] > 0
    assert 0 < ours["startup_s"] < ours["seconds"] and ours["peak_mib"] > 50
    [row] = bench_dataset.run(("memory",), images=8, batch=4, rounds=1, log=lambda row: None)
    assert row["suite"] == "dataset" and row["what"].startswith("peak memory") and row["ratio"] > 0.5
