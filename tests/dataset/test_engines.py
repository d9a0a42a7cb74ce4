"""The engines on local clusters: Dask and Ray Data give the local loop's store to the bit; JAX shards a batch.

Small on purpose (a couple of dozen 16-pixel images, a 3-layer model): what is checked is that
the same units run everywhere, resume, and agree, not speed (benchmarks/bench_dataset.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr  # noqa: E402

import gradcam_ref  # noqa: E402
from tests.dataset.helpers import KW, SIZE, N  # noqa: E402
from tests.dataset.test_explain_dataset import assert_same_store, chunk_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dask_on_a_local_cluster_resumes_and_equals_the_local_loop(images, model, reference, tmp_path):
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

            # Workers started with Dask's own default (65536) are named in a warning.
            client.run(lambda: os.environ.__setitem__("MALLOC_TRIM_THRESHOLD_", "65536"))
            with pytest.warns(RuntimeWarning, match="MALLOC_TRIM_THRESHOLD_=65536, which makes torch CPU inference"):
                gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "w.zarr", engine="dask",
                                            scheduler=client, **KW)
    finally:
        cluster.close()


@pytest.mark.slow
def test_ray_data_actors_equal_the_local_loop(images, model, reference, tmp_path):
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
