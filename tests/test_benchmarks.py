"""Smoke test of the benchmark harness (``benchmarks/``) on tiny inputs: fast, and it can fail.

The figures themselves come from ``make bench``; here the machinery is checked, with no timing
bound (a shared machine would make it flake): paired ratios on a fake clock cancel the machine's
load exactly and ignore a spike, rows have the documented structure, the peak-memory
probe sees an allocation, the compared core formulations compute the same map, and the peers are
called on the same layer and targets as ours (same maps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradcam_ref
from benchmarks import bench_core, bench_jax, bench_overhead, bench_torch, memory, methods, models, report, timing
from benchmarks.timing import paired_ratios, tiered_ratios

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """``time.perf_counter`` for the harness: a method "takes" its cost, times the machine's load.

    The load changes from round to round (a shared machine): every method of a round is slowed
    alike, which pairing must cancel. ``spike`` adds a one-off delay to one call of one method,
    which the median must ignore.
    """

    def __init__(self, methods: int, slow_rounds=(2, 5), spike=None):
        self.now, self.calls, self.methods = 0.0, 0, methods
        self.slow_rounds, self.spike = set(slow_rounds), spike

    def perf_counter(self) -> float:
        return self.now

    def method(self, name: str, cost: float):
        def run():
            load = 3.0 if self.calls // self.methods in self.slow_rounds else 1.0
            extra = 100.0 if self.spike == (name, self.calls // self.methods) else 0.0
            self.now += cost * load + extra
            self.calls += 1
        return run


def test_paired_ratios_cancel_the_machines_load_and_ignore_a_spike(monkeypatch):
    clock = FakeClock(3, spike=("same", 4))
    monkeypatch.setattr(timing, "time", clock)
    methods = {"base": clock.method("base", 1.0), "same": clock.method("same", 1.0),
               "four times": clock.method("four times", 4.0)}
    results = paired_ratios(methods, "base", rounds=15, inner=1, warmup=0)
    assert results["base"] == {"ratio": 1.0, "q1": 1.0, "q3": 1.0, "seconds": 1.0, "rounds": 15}
    assert results["same"]["ratio"] == 1.0 and results["same"]["q3"] == 1.0  # one spike of 15: not the median
    assert results["four times"] == {"ratio": 4.0, "q1": 4.0, "q3": 4.0, "seconds": 4.0, "rounds": 15}
    assert clock.calls == 45  # each method once per round


def test_paired_ratios_run_on_the_real_clock():
    """The real clock is wired in (no bound on the figures: that is the benchmarks' job)."""
    data = np.arange(10_000, dtype=np.float64)
    results = paired_ratios({"base": lambda: float(data.sum()), "other": lambda: float(np.sqrt(data).sum())},
                            "base", rounds=3, inner=2)
    for r in results.values():
        assert math.isfinite(r["ratio"]) and r["seconds"] > 0 and r["q1"] <= r["ratio"] <= r["q3"]


def test_paired_ratios_refuses_an_unknown_baseline():
    with pytest.raises(ValueError, match="baseline 'nope'"):
        paired_ratios({"a": lambda: None}, "nope", rounds=1)


def test_tiered_ratios_gives_costly_methods_their_own_shorter_series(monkeypatch):
    clock = FakeClock(2, slow_rounds=())
    monkeypatch.setattr(timing, "time", clock)
    methods = {"base": clock.method("base", 1.0), "same": clock.method("same", 1.0),
               "costly": clock.method("costly", 20.0)}
    results = tiered_ratios(methods, "base", budget_s=0.0, min_rounds=6, costly_min_rounds=3)
    assert results["same"]["rounds"] == 6 and results["costly"]["rounds"] == 3
    assert results["same"]["ratio"] == 1.0 and results["costly"]["ratio"] == 20.0


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
    assert one == ONE and multi == MULTI  # every peer ran: a missing one fails, it is not left out
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
    assert methods.available("captum") and methods.available("torchcam")  # test dependencies: never skipped
    captum = methods.make("captum", model, layer, x, targets).call()
    torch.testing.assert_close(torch.relu(captum[:, 0]), ours, rtol=1e-5, atol=1e-6)
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
    assert methods.available("captum")  # a test dependency: never skipped
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
    floor = "autograd alone (floor)"
    assert [(r["targets"], r["method"]) for r in rows] == [
        (1, "forward"), (1, floor), (1, "gradcam_ref.explain"),
        (10, "forward"), (10, floor), (10, "gradcam_ref.explain")]
    for r in rows:  # the rows' arithmetic, not the timings (a unit test never judges speed)
        forward = next(f for f in rows if f["targets"] == r["targets"] and f["method"] == "forward")
        assert r["suite"] == "overhead" and r["library"] == "torch" and r["seconds"] > 0
        assert r["extra_ms"] == pytest.approx((r["seconds"] - forward["seconds"]) * 1e3, rel=1e-12, abs=1e-12)
    assert "gradcam_ref.explain" in report.overhead_table(rows) and floor in report.overhead_table(rows)


@pytest.mark.parametrize("per_image", [1, 3])
def test_the_overhead_floor_computes_explains_gradients(per_image):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    a = torch.randn(1, 8, 3, 3) * 4
    targets = np.array([2]) if per_image == 1 else np.array([[4, 0, 2]])
    got = bench_overhead.autograd_alone(model[1:], a, targets)
    torch.testing.assert_close(got, gradcam_ref.explain(model, a, targets, layer="0").gradients, rtol=0, atol=0)


def test_jax_named_layer_rows_of_a_tiny_linen_model():
    import flax.linen as nn
    import jax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5)(jax.numpy.tanh(nn.Conv(4, (1, 1), name="conv")(x)).mean(axis=(1, 2)))

    x = np.zeros((1, 6, 6, 3), np.float32)
    model = Tiny().bind(Tiny().init(jax.random.key(0), x))
    rows = bench_jax.run_named(rounds=3, configs=[(2, 1), (1, 3)], model=model, layer="conv", call=None,
                               image_shape=(6, 6, 3), classes=5, name="tiny")
    assert [(r["batch"], r["targets"], r["method"]) for r in rows] == [
        (2, 1, bench_jax.FORWARD), (2, 1, bench_jax.EXPLAIN_NAMED), (1, 3, bench_jax.FORWARD),
        (1, 3, bench_jax.EXPLAIN_NAMED)]
    for r in rows:
        assert r["suite"] == "jax" and r["model"] == "tiny" and r["compile_s"] >= 0 and r["seconds"] > 0
        assert r["ratio"] == 1.0 if r["method"] == bench_jax.FORWARD else r["ratio"] > 0


def test_family_suite_rows_and_goals_on_a_tiny_model():
    """The CAM-family suite's rows (ours only: importing pytorch-grad-cam is slow) and its goal lines."""
    from benchmarks import bench_family

    rows = bench_family.run("tiny", ("hirescam", "ablation-cam"), budget_s=0.0, max_rounds=2, min_rounds=2,
                            costly_min_rounds=1, peers=False)
    assert [(r["library"], r["method"]) for r in rows] == [
        ("forward", "forward"), ("gradcam_ref", "hirescam"), ("gradcam_ref", "ablation-cam")]
    assert all(r["suite"] == "family" and r["ratio"] > 0 and r["q1"] <= r["ratio"] <= r["q3"] for r in rows)
    lines = report.family_goals_text({"rows": rows}).splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["tiny b1 hirescam", "tiny b1 ablation-cam"]
    assert "| gradcam_ref | pytorch-grad-cam 1.5.7 |" in report.family_table(rows)


def test_family_command_replaces_only_its_methods_rows(tmp_path, capsys):
    """``python -m benchmarks.bench_family --methods ... --json FILE``: prints the rows, replaces
    those methods' rows of that model in FILE and keeps every other row."""
    from benchmarks import bench_family

    path = tmp_path / "family.json"
    kept = [{"suite": "family", "model": "tiny", "method": "grad-cam", "library": "gradcam_ref", "ratio": 1.0},
            {"suite": "family", "model": "resnet18", "method": "score-cam", "library": "gradcam_ref", "ratio": 9.0}]
    path.write_text(json.dumps([*kept, {**kept[1], "model": "tiny"}]))
    assert bench_family.main(["--methods", "score-cam", "--model", "tiny", "--rounds", "2", "--no-peers",
                              "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert rows[:2] == kept
    (new,) = rows[2:]
    assert (new["model"], new["method"], new["library"], new["rounds"]) == ("tiny", "score-cam", "gradcam_ref", 2)
    assert new["ratio"] > 0 and new["forward_seconds"] > 0 and len(new["loadavg_1min_before_after"]) == 2
    assert "tiny score-cam" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_family.main(["--methods", "score-kam"])


def test_results_are_written_whole_into_a_new_folder_or_not_at_all(tmp_path):
    """``report.save``: the folder is made, the file is complete (it loads back equal) or absent
    (a row that cannot be written leaves neither it nor a temporary file); ``report.writable``
    accepts a path whose folders can be made (making nothing yet) and refuses a folder as the
    file, so that a run fails at its start, not after minutes."""
    path = tmp_path / "new" / "deeper" / "results.json"
    document = {"rows": [{"ratio": 1.25, "seconds": np.float64(0.5)}], "notes": []}
    assert report.writable(str(path)) == str(path) and not path.parent.parent.exists()
    report.save(str(path), document)
    assert report.load(str(path)) == {"rows": [{"ratio": 1.25, "seconds": 0.5}], "notes": []}
    with pytest.raises(TypeError):
        report.save(str(path), {"rows": [{"ratio": object()}]})
    assert report.load(str(path))["rows"][0]["ratio"] == 1.25  # the earlier file, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory, not a file"):
        report.writable(str(tmp_path))


def test_the_full_run_checks_its_json_path_before_measuring(tmp_path, monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.setattr(run, "run", lambda **kw: pytest.fail("measured before checking --json"))
    with pytest.raises(SystemExit):
        run.main(["--suites", "core", "--json", str(tmp_path)])
    assert f"argument --json: {tmp_path}: is a directory, not a file" in capsys.readouterr().err


def tiny_keras_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(max_value=6.0, name="head")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x), name="tiny")


def test_tensorflow_rows_of_a_tiny_model_and_the_peers_explain_what_we_do():
    """The TF suite's rows, and its peers' calls give our maps under their conventions (same
    layer, same targets; T targets as the image repeated)."""
    from benchmarks import bench_tensorflow

    # In a fresh interpreter, as the runner runs it: TensorFlow keeps CPU allocator statistics
    # only if asked for before it starts (bench_tensorflow.keep_allocator_stats), and this
    # process's TensorFlow runs with its default allocator, as users' does.
    code = ("import json\nfrom benchmarks import bench_tensorflow\nbench_tensorflow.keep_allocator_stats()\n"
            "from tests.test_benchmarks import tiny_keras_model\n"
            "rows = bench_tensorflow.run(rounds=2, configs=[(2, 1), (1, 3)], model=tiny_keras_model(), name='tiny')\n"
            "print(json.dumps(rows, default=float))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    model = tiny_keras_model()
    methods_run = [r["method"] for r in rows if r["batch"] == 2]
    assert methods_run == [bench_tensorflow.FORWARD, bench_tensorflow.EXPLAIN, "tf-keras-vis Gradcam",
                           "xplique GradCAM"]
    for r in rows:
        assert r["suite"] == "tensorflow" and r["seconds"] > 0 and r["memory_mib"] >= 0
        assert r["ratio"] == 1.0 if r["method"] == bench_tensorflow.FORWARD else r["ratio"] > 0
    assert "gradcam_ref.explain" in report.tensorflow_table(rows)
    x = np.random.default_rng(1).standard_normal((1, 10, 10, 3)).astype(np.float32)
    targets = np.array([[0, 2, 4]])
    calls = bench_tensorflow._methods(model, x, targets)
    ours = gradcam_ref.explain(model, x, targets, layer="head")
    for method, convention in (("tf-keras-vis Gradcam", "tf-keras-vis"), ("xplique GradCAM", "xplique")):
        theirs = np.asarray(calls[method]())
        theirs = theirs[..., 0] if theirs.ndim == 4 else theirs
        expected = ours.heatmap((10, 10), convention)[0]
        assert np.abs(theirs - expected).max() <= 1e-5 * np.abs(expected).max(), method


def test_allocator_statistics_are_asked_for_before_tensorflow_starts(monkeypatch):
    """Once TensorFlow runs without CPU allocator statistics (its default allocator, oneDNN off), asking
    for them is a clear error, not a ValueError from the middle of a run; with them, nothing to say."""
    import tensorflow as tf

    from benchmarks import bench_tensorflow

    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "unset")  # restored (to unset) after the test
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC")
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        with pytest.raises(RuntimeError, match=r"TensorFlow was imported before .*keep_allocator_stats.*"
                                               r"TF_CPU_ALLOCATOR_USE_BFC"):
            bench_tensorflow.keep_allocator_stats()
    else:  # this machine's TensorFlow keeps them already (oneDNN's allocator, on with AVX-512)
        bench_tensorflow.keep_allocator_stats()
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "true"  # for the fresh interpreters it starts


def test_tf_family_rows_of_a_tiny_model_compare_the_same_maps():
    """bench_tf_family's pairs return the same map on both sides (ours under the library's convention)."""
    from benchmarks import bench_tf_family

    model = tiny_keras_model()
    rows = bench_tf_family.run(rounds=2, model=model, name="tiny")
    assert [r["method"] for r in rows] == [bench_tf_family.FORWARD, *(m for pair in bench_tf_family.PAIRS for m in pair)]
    assert all(r["seconds"] > 0 and r["ratio"] > 0 and len(r["load_average"]) == 3 for r in rows)
    x = np.random.default_rng(0).standard_normal((1, 10, 10, 3)).astype(np.float32)
    calls = bench_tf_family._calls(model, x, 3)
    for ours, theirs in bench_tf_family.PAIRS:
        a, b = np.asarray(calls[ours]()), np.asarray(calls[theirs]())
        b = b[..., 0] if b.ndim == 4 else b
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (ours, theirs)


@pytest.mark.slow
def test_dataset_benchmark_measures_peak_memory_and_throughput_in_fresh_processes(tmp_path):
    """bench_dataset's children run explain_dataset and the plain loop on real files (tiny model)."""
    import zarr  # noqa: F401  (part of make test: no skip)

    from benchmarks import bench_dataset

    paths = bench_dataset.make_images(tmp_path / "images", 8)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths * 2) + "\n")
    ours = bench_dataset.run_child("dataset", listing, 4, model="tiny")
    loop = bench_dataset.run_child("loop", listing, 4, model="tiny")
    scored = bench_dataset.run_child("dataset-scored", listing, 4, model="tiny")
    assert ours["images_per_s"] > 0 and loop["images_per_s"] > 0 and scored["images_per_s"] > 0
    assert 0 < ours["startup_s"] < ours["seconds"] and ours["peak_mib"] > 50
    [row] = bench_dataset.run(("memory",), images=8, batch=4, rounds=1, log=lambda row: None)
    assert row["suite"] == "dataset" and row["what"].startswith("peak memory") and row["ratio"] > 0.5


def test_dataset_engine_rows_separate_the_fixed_cost_from_the_marginal_rate(tmp_path, monkeypatch):
    """engine_rows' arithmetic on children whose times are known: T(n) = fixed + n / rate."""
    from benchmarks import bench_dataset

    fixed = {("infer", 1): 2.0, ("infer", 2): 3.0, ("explain", 1): 4.0, ("explain", 2): 6.0}
    rates = {("infer", 1): 20.0, ("infer", 2): 36.0, ("explain", 1): 19.0, ("explain", 2): 34.0}

    def child(mode, listing, batch, workers=1):
        what = mode.split("-")[1]
        n = len(Path(listing).read_text().split())
        seconds = fixed[what, workers] + n / rates[what, workers]
        return {"seconds": seconds, "images_per_s": n / seconds, "cpu_s": {"driver": 1.0, "workers": n, "system": 0.0}}

    monkeypatch.setattr(bench_dataset, "run_child", child)
    paths = [f"{i}.jpg" for i in range(128)]
    rows = {r["what"].split(" (")[0] + "/" + r["kind"]: r
            for r in bench_dataset.engine_rows("dask", paths, tmp_path, 16, 1, log=lambda row: None)}
    assert rows["dask: explain_dataset / inference only, 2 workers/marginal"]["ratio"] == pytest.approx(34 / 36)
    assert rows["dask: explain_dataset, 2 workers / 1 worker/marginal"]["ratio"] == pytest.approx(34 / 19)
    end = rows["dask: explain_dataset / inference only, 2 workers/end_to_end"]
    assert end["ratio"] == pytest.approx((3 + 128 / 36) / (6 + 128 / 34))
    assert "fixed cost 6.0 vs 3.0 s" in end["detail"]
    assert end["cpu_s_per_image"]["2 workers, explain"] == {"driver": round(1 / 128, 3), "workers": 1.0, "system": 0.0}

    # A run swamped by the load (the larger one not the longer one) gives no marginal rate, not a negative one.
    rates["explain", 2] = -1e9
    rows = bench_dataset.engine_rows("dask", paths, tmp_path, 16, 1, log=lambda row: None)
    marginal = [r for r in rows if r["kind"] == "marginal"]
    assert [r["ratio"] for r in marginal] == [None, None]


def test_dataset_local_and_metrics_rows_pair_alternating_children(tmp_path, monkeypatch):
    """run("local", "metrics"): each round runs the baseline child then ours; medians of the ratios."""
    from benchmarks import bench_dataset

    speeds = {"loop": [10.0, 20.0, 40.0], "dataset": [9.0, 19.0, 30.0, 8.0, 18.0, 33.0],
              "dataset-scored": [4.0, 19.0, 15.0]}
    calls = []

    def child(mode, listing, batch, **_):
        calls.append(mode)
        return {"images_per_s": speeds[mode].pop(0), "startup_s": 0.5 * len(calls)}

    monkeypatch.setattr(bench_dataset, "run_child", child)
    monkeypatch.setattr(bench_dataset, "make_images", lambda folder, n: [f"{i}.jpg" for i in range(n)])
    local, metrics = bench_dataset.run(("local", "metrics"), images=4, batch=2, rounds=3, log=lambda row: None)
    assert calls == ["loop", "dataset"] * 3 + ["dataset", "dataset-scored"] * 3
    assert local["ratio"] == pytest.approx(0.9)  # median of 9/10, 19/20, 30/40
    assert local["startup_s"] == 2.0  # ours started at calls 2, 4, 6: 1.0, 2.0, 3.0
    assert local["detail"].startswith("19.0 vs 20.0 images/s, 4 images; startup 2.00 s; rounds [0.9, 0.95, 0.75]")
    assert metrics["ratio"] == pytest.approx(0.5)  # median of 4/8, 19/18, 15/33
    assert metrics["detail"].startswith("15.0 vs 18.0 images/s, 4 images; rounds")


def test_overhead_steps_time_each_step_and_restore_the_functions(capsys):
    """bench_overhead_steps on the all-head model, this tree against a copy of itself as the base."""
    import gradcam_ref.backends.torch as torch_backend
    from benchmarks import bench_overhead_steps
    from gradcam_ref.backends.torch import _backward, _forward

    before = {(module, name): getattr(module, name)
              for module, name in ((_forward, "hooked"), (_backward, "gradients"), (torch_backend, "grad_cam_fields"))}
    from_capture = torch_backend.Explanation.__dict__["from_capture"]
    select, threads = gradcam_ref.backends.select, torch.get_num_threads()
    try:
        bench_overhead_steps.main(["--rounds", "3", "--step-rounds", "2", "--targets", "1", "--base", str(ROOT)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "floor (autograd_alone):" in out and "explain, this tree:" in out and "explain, base:" in out
    assert "x, median of per-round ratios)" in out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for step, *_ in bench_overhead_steps.STEPS:
        values = rows[step].strip(" |").split(" | ")[1:]
        assert len(values) == 2 and all(float(v) >= 0 for v in values), rows[step]
    assert {(module, name): getattr(module, name) for module, name in before} == before
    assert torch_backend.Explanation.__dict__["from_capture"] is from_capture
    assert gradcam_ref.backends.select is select
    assert not any(m.startswith("gradcam_ref_base") for m in sys.modules)


def test_overhead_steps_pair_differences_and_ratios_by_round(monkeypatch):
    """paired(): medians of per-round differences to the forward (ms) and of per-round ratios."""
    from benchmarks import bench_overhead_steps

    times = {"forward": iter([1.0, 2.0, 4.0]), "explain": iter([1.5, 2.2, 8.0])}
    monkeypatch.setattr(bench_overhead_steps, "_cpu", lambda call: next(times[call()]))
    ratios: dict[str, float] = {}
    found = bench_overhead_steps.paired({"forward": lambda: "forward", "explain": lambda: "explain"}, 3,
                                        ratios=ratios)
    assert found == pytest.approx({"forward": 2000.0, "explain": 500.0})  # medians of 1, 2, 4 and .5, .2, 4 s
    assert ratios == pytest.approx({"explain": 1.5})  # median of 1.5, 1.1, 2.0
