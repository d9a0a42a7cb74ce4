"""The engines on local clusters: Dask and Ray Data give the local loop's store to the bit; JAX shards a batch.

Small on purpose (a couple of dozen 16-pixel images, a 3-layer model): what is checked is that
the same units run everywhere, resume, and agree, not speed (benchmarks/bench_dataset.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr  # noqa: E402

import gradcam_ref  # noqa: E402
from tests.dataset.helpers import KW, SIZE, N, box_of  # noqa: E402
from tests.dataset.test_explain_dataset import assert_same_store, chunk_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scoring(images):
    """Metrics scored in the same pass (boxes as an array: nothing for a worker to import)."""
    return {"metrics": ("deletion", "relevance_mass", "average_drop"), "metric_options": {"steps": 6},
            "boxes": np.array([box_of(str(p)) for p in images])}


@pytest.fixture(scope="module")
def scored(images, model, scoring, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "maps.zarr"
    gradcam_ref.explain_dataset(model, images, out=out, **scoring, **KW)
    return zarr.open_group(out, mode="r")


def assert_same_scores(a, b, names):
    assert_same_store(a, b)
    for name in names:
        x, y = a[f"metrics/{name}"][:], b[f"metrics/{name}"][:]
        assert np.isfinite(x).all() and np.array_equal(x, y), name


@pytest.mark.slow
def test_dask_on_a_local_cluster_resumes_and_equals_the_local_loop(images, model, reference, scoring, scored,
                                                                    tmp_path):
    import distributed  # noqa: F401  (part of make test: no skip)
    from distributed import Client

    from gradcam_ref.dataset import _engines

    out = tmp_path / "dask.zarr"
    first = gradcam_ref.explain_dataset(model, images, out=out, shard=(0, 3), **KW)  # 2 units here, 4 on Dask
    finished = chunk_stats(out)
    cluster = _engines.local_cluster(2)
    try:
        with Client(cluster) as client:
            trims = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
            assert len(trims) == 2 and all(v == os.environ.get("MALLOC_TRIM_THRESHOLD_") for v in trims.values())
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no MALLOC_TRIM_THRESHOLD_ warning
                summary = gradcam_ref.explain_dataset(model, images, out=out, engine="dask", scheduler=client, **KW)
            assert (summary.skipped_units, summary.computed_units) == (first.computed_units, 6 - first.computed_units)
            assert all(chunk_stats(out)[k] == v for k, v in finished.items())
            assert_same_store(reference, zarr.open_group(out, mode="r"))

            # Scored in the same pass on the workers: the local loop's scores to the bit, resumed too.
            scores = tmp_path / "dask-scores.zarr"
            gradcam_ref.explain_dataset(model, images, out=scores, shard=(1, 2), **scoring, **KW)
            again = gradcam_ref.explain_dataset(model, images, out=scores, engine="dask", scheduler=client,
                                                **scoring, **KW)
            assert (again.skipped_units, again.computed_units) == (3, 3)
            assert_same_scores(scored, zarr.open_group(scores, mode="r"), scoring["metrics"])

            # Workers started with Dask's own default (65536) are named in a warning.
            client.run(lambda: os.environ.__setitem__("MALLOC_TRIM_THRESHOLD_", "65536"))
            with pytest.warns(RuntimeWarning, match="MALLOC_TRIM_THRESHOLD_=65536, which makes torch CPU inference"):
                gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "w.zarr", engine="dask",
                                            scheduler=client, **KW)
    finally:
        cluster.close()


def _loaded() -> list[str]:
    """What a worker has of the warm-up's imports (zarr is not asked: this module imports it)."""
    return sorted(m for m in ("gradcam_ref.backends.torch", "sympy") if m in sys.modules)


@pytest.mark.slow
def test_dask_workers_warm_up_before_their_first_unit_and_a_new_store_equals_the_local_loop(images, model, reference,
                                                                                           tmp_path):
    """A new store on Dask: the connection is made before the probe and each worker imports the
    backend, zarr and what torch's first autograd.grad imports (sympy) at once, not in its first unit."""
    from distributed import Client

    from gradcam_ref.dataset import _engines

    cluster = _engines.local_cluster(2)
    try:
        with Client(cluster) as client:
            pids = client.run(os.getpid)
            assert list(client.run(_loaded).values()) == [[], []]  # fresh workers: nothing of it yet
            connection = _engines.DaskConnection(2, client, "torch")
            assert sorted(map(int, client.gather(connection.warm))) == sorted(pids.values())  # once on each
            assert list(client.run(_loaded).values()) == [["gradcam_ref.backends.torch", "sympy"]] * 2
            connection.close()
            assert client.status == "running"  # a given client is the caller's: left open

            out = tmp_path / "new.zarr"
            summary = gradcam_ref.explain_dataset(model, images, out=out, engine="dask", scheduler=client, **KW)
            assert (summary.skipped_units, summary.computed_units, summary.computed_images) == (0, 6, N)
            assert_same_store(reference, zarr.open_group(out, mode="r"))
            assert client.run(os.getpid) == pids  # the same workers did the units
    finally:
        cluster.close()


@pytest.mark.slow
def test_dask_without_a_scheduler_starts_its_own_cluster_and_closes_it_when_done_or_when_the_probe_fails(
        images, model, reference, tmp_path):
    import psutil

    def workers() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())}

    before = workers()
    out = tmp_path / "own.zarr"
    summary = gradcam_ref.explain_dataset(model, images, out=out, engine="dask", workers=1, **KW)
    assert (summary.computed_units, summary.computed_images) == (6, N)
    assert_same_store(reference, zarr.open_group(out, mode="r"))
    with pytest.raises(ValueError, match="layer"):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / "bad.zarr", engine="dask", workers=1,
                                    **{**KW, "layer": "no-such-layer"})
    assert not (tmp_path / "bad.zarr").exists()
    deadline = time.monotonic() + 30
    while workers() - before and time.monotonic() < deadline:  # a closed cluster's processes exit
        time.sleep(0.2)
    assert workers() - before == set()


@pytest.mark.slow
def test_ray_data_actors_equal_the_local_loop(images, model, reference, scoring, scored, tmp_path):
    import ray
    import ray.data  # noqa: F401
    out = tmp_path / "ray.zarr"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = gradcam_ref.explain_dataset(model, images, out=out, engine="ray", workers=2, **KW)
        assert (summary.computed_units, summary.computed_images, summary.failed) == (6, N, ())
        assert_same_store(reference, zarr.open_group(out, mode="r"))
        again = gradcam_ref.explain_dataset(model, images, out=out, engine="ray", workers=2, **KW)
        assert (again.skipped_units, again.computed_units) == (6, 0)
        scores = tmp_path / "ray-scores.zarr"
        gradcam_ref.explain_dataset(model, images, out=scores, engine="ray", workers=2, **scoring, **KW)
        assert_same_scores(scored, zarr.open_group(scores, mode="r"), scoring["metrics"])
    finally:
        ray.shutdown()


JAX_SCRIPT = """
import sys
import numpy as np
import jax, jax.numpy as jnp, zarr
import gradcam_ref
from gradcam_ref.dataset import _job

W1 = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 3, 3)), jnp.float32)
W2 = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)

def features(x):
    a = jax.lax.conv_general_dilated(x, W1, (2, 2), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return jax.nn.relu(a)

def head(a):
    return a.mean(axis=(2, 3)) @ W2.T

images, out = sys.argv[1], sys.argv[2]
assert len(jax.local_devices()) == 2
s = _job.jax_sharded(np.zeros((4, 3, 16, 16), np.float32))
assert isinstance(s.sharding, jax.sharding.NamedSharding) and len(s.sharding.device_set) == 2
assert s.addressable_shards[0].data.shape == (2, 3, 16, 16)
summary = gradcam_ref.explain_dataset((features, head), images, out=out, batch_size=4, size=16, num_workers=1,
                                      progress=False)
g = zarr.open_group(out, mode="r")
load = gradcam_ref.dataset.Preprocess((16, 16))
paths = list(g["paths"][:])
worst = 0.0
for start in range(0, len(paths), 4):
    batch = np.stack([load(p) for p in paths[start:start + 4]])
    e = gradcam_ref.explain((features, head), jax.device_put(batch, jax.devices()[0]))
    np.testing.assert_array_equal(g["targets"][start:start + 4], np.asarray(e.targets))
    np.testing.assert_allclose(g["maps"][start:start + 4], np.asarray(e.maps), rtol=1e-5, atol=1e-6)
    worst = max(worst, float(np.abs(g["maps"][start:start + 4] - np.asarray(e.maps)).max()))
print("ok", summary.computed_units, worst)
"""


@pytest.mark.slow
def test_jax_maps_are_sharded_over_two_local_devices_and_equal_one_device(images, tmp_path):
    import jax  # noqa: F401  (part of make test: no skip)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(JAX_SCRIPT), str(images[0].parent),
                             str(tmp_path / "jax.zarr")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["ok", "6"], result.stdout


def test_the_units_are_the_same_for_every_engine_in_a_worker_copy(images, model):
    """What an engine's worker gets (a pickled Job) runs a unit exactly like the local loop."""
    import pickle

    from gradcam_ref.dataset import Preprocess, _job

    job = _job.Job(model=model, paths=[str(p) for p in images], out="unused", batch_size=4, layer="2", target=None,
                   method="grad-cam", options={}, load=Preprocess((SIZE, SIZE)), on_error="record", device=None,
                   threads=1, evaluate=None, dtype=None, framework="torch")
    copy = pickle.loads(pickle.dumps(job))
    assert copy._cache == {} and copy.model is not model
    a, b = job.outputs(*job.read(1)), copy.outputs(*copy.read(1))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
