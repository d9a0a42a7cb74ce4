"""explain_dataset on one machine: the store's values, resuming, shards, bad input, full disk, kill -9, signals."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402
import zarr  # noqa: E402

import gradcam_ref  # noqa: E402
from gradcam_ref.dataset import (  # noqa: E402
    Preprocess,
    StoreMismatch,
    UnreadableImage,
    _store,
    list_images,
    parse_shard,
    shard_units,
)
from tests.dataset.helpers import KW, SIZE, N, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def arrays(group):
    return {name: group[name][:] for name in ("maps", "targets", "scores", "top_classes", "top_scores", "errors")}


def assert_same_store(a, b):
    for name, x in arrays(a).items():
        y = b[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def chunk_stats(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every chunk file: a rewritten chunk changes both."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(out)).replace(os.sep, "/")}


# --- what the store holds ---------------------------------------------------------------------


def test_store_holds_what_explain_computes_on_the_same_batches(images, model, reference):
    load = Preprocess((SIZE, SIZE))
    for start in range(0, N, 4):
        batch = torch.from_numpy(np.stack([load(str(p)) for p in images[start:start + 4]]))
        e = gradcam_ref.explain(model, batch, layer="2")
        scores = e.scores.numpy()
        np.testing.assert_array_equal(reference["maps"][start:start + 4], e.maps.numpy())
        np.testing.assert_array_equal(reference["targets"][start:start + 4], e.targets)
        np.testing.assert_array_equal(reference["targets"][start:start + 4], scores.argmax(1))
        np.testing.assert_array_equal(reference["scores"][start:start + 4], scores.max(1))
        np.testing.assert_array_equal(reference["top_classes"][start:start + 4], np.argsort(-scores, 1, kind="stable"))
        np.testing.assert_array_equal(reference["top_scores"][start:start + 4], -np.sort(-scores, 1))
    assert reference["maps"].shape == (N, 8, 8) and reference["maps"].chunks == (4, 8, 8)
    assert reference["maps"].dtype == np.float32
    assert list(reference["paths"][:]) == [str(p.resolve()) for p in images]
    assert list(reference["errors"][:]) == [""] * N
    attrs = reference.attrs["gradcam_ref"]
    assert attrs["layer"] == "2" and attrs["method"] == "grad-cam" and attrs["batch_size"] == 4
    assert attrs["model"]["class"] == ["torch.nn.modules.container.Sequential"] and len(attrs["model"]["sha256"]) == 64
    assert attrs["versions"]["torch"] == torch.__version__ and attrs["versions"]["zarr"] == zarr.__version__
    assert attrs["layout"]["maps"] == [8, 8] and attrs["layout"]["dtype"] == "float32"


def test_preprocessing_is_the_command_lines(images):
    """The default pipeline gives the very arrays `gradcam-ref explain` feeds the model."""
    from gradcam_ref import zoo
    from gradcam_ref.cli._common import load_image, preprocess

    size = (zoo.IMAGENET_SIZE, zoo.IMAGENET_SIZE)
    ours = np.stack([Preprocess(size)(str(p)) for p in images[:3]])
    cli = preprocess([load_image(p) for p in images[:3]], size, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)
    np.testing.assert_array_equal(ours, cli)


def test_decoding_in_dataloader_workers_gives_the_same_store(images, model, reference, tmp_path):
    gradcam_ref.explain_dataset(model, images, out=tmp_path / "w.zarr", **{**KW, "num_workers": 2})
    assert_same_store(reference, zarr.open_group(tmp_path / "w.zarr", mode="r"))


def test_folder_and_list_file_give_the_same_paths(images, tmp_path):
    listing = tmp_path / "list.txt"
    folder = images[0].parent
    listing.write_text("# images\n" + "\n".join(os.path.relpath(p, tmp_path) for p in images) + "\n\n")
    assert list_images(folder) == list_images(listing) == [str(p.resolve()) for p in images]


def test_targets_and_the_evaluation_hook(images, model, tmp_path):
    def evaluate(model_, inputs, explanation):
        return {"peak": explanation.maps.flatten(1).amax(1)}

    summary = gradcam_ref.explain_dataset(model, images[:8], out=tmp_path / "t.zarr", target=[1, 3],
                                          evaluate=evaluate, **KW)
    g = zarr.open_group(tmp_path / "t.zarr", mode="r")
    batch = torch.from_numpy(np.stack([Preprocess((SIZE, SIZE))(str(p)) for p in images[:4]]))
    e = gradcam_ref.explain(model, batch, np.array([[1, 3]] * 4), layer="2")
    assert g["maps"].shape == (8, 2, 8, 8)
    np.testing.assert_array_equal(g["maps"][:4], e.maps.numpy())
    np.testing.assert_array_equal(g["targets"][:], [[1, 3]] * 8)
    np.testing.assert_array_equal(g["scores"][:4], e.scores.numpy()[:, [1, 3]])
    np.testing.assert_array_equal(g["metrics/peak"][:], g["maps"][:].reshape(8, -1).max(1))
    assert summary.computed_units == 2 and summary.computed_images == 8


def test_method_and_options_go_to_explain_as_they_are(images, model, tmp_path, monkeypatch):
    seen = []
    real = gradcam_ref.explain

    def explain(model_, inputs, target=None, *, layer=None, method="grad-cam", **options):
        seen.append((method, options))
        return real(model_, inputs, target, layer=layer, **options)

    monkeypatch.setattr(gradcam_ref, "explain", explain)
    gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "m.zarr", method="hirescam", at="output", **KW)
    assert seen and all(s == ("hirescam", {"at": "output"}) for s in seen)
    assert zarr.open_group(tmp_path / "m.zarr").attrs["gradcam_ref"]["method"] == "hirescam"


def test_model_is_left_as_it_was(images, tmp_path):
    model = tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # conv/ReLU/linear compute the same in training mode: no warning
        warnings.simplefilter("error", gradcam_ref.TrainingModeWarning)
        gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "x.zarr", device="cpu", **KW)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_model_fingerprint_covers_every_weight_and_buffer():
    from gradcam_ref.dataset._job import fingerprint

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()

    a, b = net(0), net(0)
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)["sha256"]) == 64
    b[1].num_batches_tracked += 1  # a 0-d int64 buffer
    assert fingerprint(a) != fingerprint(b)
    c = net(0)
    with torch.no_grad():
        c[0].weight[0, 0, 0, 0] += 1e-7
    assert fingerprint(a) != fingerprint(c)
    assert fingerprint((a, b))["class"] == ["torch.nn.modules.container.Sequential"] * 2


# --- resuming and shards ----------------------------------------------------------------------


def test_resume_recomputes_nothing_and_ends_bit_identical(images, model, reference, tmp_path):
    out = tmp_path / "r.zarr"
    first = gradcam_ref.explain_dataset(model, images, out=out, shard=(0, 2), **KW)
    assert (first.units, first.units_in_shard, first.computed_units, first.skipped_units) == (6, 3, 3, 0)
    finished = chunk_stats(out)
    assert _store.done_units(out, zarr.open_group(out)) == {0, 1, 2}
    second = gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert (second.skipped_units, second.computed_units, second.computed_images) == (3, 3, 10)
    after = chunk_stats(out)
    assert all(after[k] == v for k, v in finished.items())  # not one finished chunk rewritten
    assert_same_store(reference, zarr.open_group(out, mode="r"))
    third = gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert third.computed_units == 0 and chunk_stats(out) == after


def test_shards_split_the_units_into_contiguous_blocks_once():
    for n_units in range(0, 40):
        for n in range(1, 9):
            blocks = [shard_units(n_units, (i, n)) for i in range(n)]
            assert [u for b in blocks for u in b] == list(range(n_units))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert parse_shard("3/16") == (3, 16) and parse_shard((0, 1)) == (0, 1) and parse_shard(None) is None
    for bad in ("16/16", "3", "a/b", (2, 1), (-1, 2), (True, 2), "1/2/3"):
        with pytest.raises(ValueError, match=r"shard must be \(i, n\) or 'i/n' with 0 <= i < n, got"):
            parse_shard(bad)


@pytest.mark.parametrize("change, named", [
    ({"layer": "0"}, "layer"),
    ({"batch_size": 8}, "batch_size"),
    ({"method": "x-cam"}, "method"),
    ({"size": SIZE + 2}, "preprocess"),
    ({"target": 1}, "target"),
    ({"dtype": "float64"}, "dtype"),
    ({"model": "other weights"}, "model"),
    ({"images": "fewer"}, "images"),
])
def test_resuming_with_other_settings_is_an_error_naming_the_setting(images, model, reference, change, named,
                                                                     monkeypatch):
    import gradcam_ref.dataset._job as job_module

    monkeypatch.setattr(job_module, "check_method", lambda method: None)  # x-cam: let the check be the store's
    out = Path(str(reference.store.root))
    kwargs = {**KW, **{k: v for k, v in change.items() if k not in ("model", "images")}}
    use_model = tiny_model(seed=1) if "model" in change else model
    use_images = images[:-1] if "images" in change else images
    before = chunk_stats(out)
    with pytest.raises(StoreMismatch, match=rf"^out='.*maps.zarr' was made with {named}=.*, not .*: resume with the same"):
        gradcam_ref.explain_dataset(use_model, use_images, out=out, **kwargs)
    assert chunk_stats(out) == before


def test_a_store_that_is_not_ours_is_refused(images, model, tmp_path):
    zarr.open_group(tmp_path / "foreign.zarr", mode="w").create_array("maps", shape=(2,), dtype="f4")
    with pytest.raises(ValueError, match="is a zarr group but not one made by gradcam_ref.explain_dataset"):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / "foreign.zarr", **KW)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a zarr group made by gradcam_ref.explain_dataset"):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / "folder", **KW)
    assert (tmp_path / "folder" / "notes.txt").read_text() == "mine"
    gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "ours.zarr", **KW)
    with pytest.raises(FileExistsError, match="exists; pass resume=True"):
        gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "ours.zarr", resume=False, **KW)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"on_error": "skip"}, r"on_error must be one of \('record', 'raise'\), got 'skip'"),
    ({"engine": "spark"}, r"engine must be one of \('local', 'dask', 'ray'\), got 'spark'"),
    ({"target": -1}, "target must be None .*, got -1"),
    ({"shard": "2/2"}, "shard must be"),
    ({"size": (0, 4)}, r"size must be a positive int or \(height, width\), got \(0, 4\)"),
    ({"std": (1, 0, 1)}, r"std must be 1 or 3 finite numbers > 0, got \(1, 0, 1\)"),
    ({"num_workers": -1}, "num_workers must be None or an int >= 0, got -1"),
    ({"method": "x-cam"}, r"method must be one of \[.*\], got 'x-cam'"),
])
def test_bad_arguments_are_named(images, model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / "bad.zarr", **{**KW, **kwargs})
    assert not (tmp_path / "bad.zarr").exists()


def test_image_sources_errors(tmp_path, model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder with no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such folder, list file or image"):
        list_images(tmp_path / "nothing")
    with pytest.raises(TypeError, match="expected paths"):
        list_images([1, 2])


# --- unreadable images, full disk ---------------------------------------------------------------


@pytest.fixture()
def broken(images, tmp_path):
    """The images with number 9 (unit 2) replaced by a file that is not an image."""
    paths = list(images)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths[9] = bad
    return paths


def test_an_unreadable_image_is_recorded_and_the_run_goes_on(broken, model, reference, tmp_path):
    summary = gradcam_ref.explain_dataset(model, broken, out=tmp_path / "b.zarr", **KW)
    g = zarr.open_group(tmp_path / "b.zarr", mode="r")
    reason = str(g["errors"][9])
    assert summary.failed == ((str(broken[9].resolve()), reason),)
    assert reason.startswith("UnidentifiedImageError: cannot identify image file") and str(broken[9].resolve()) in reason
    assert np.isnan(g["maps"][9]).all() and g["targets"][9] == -1 and np.isnan(g["scores"][9])
    assert (g["top_classes"][9] == -1).all()
    others = np.arange(N) != 9
    for name in ("maps", "targets", "scores", "top_scores"):  # the rest of unit 2 too, to the bit
        np.testing.assert_array_equal(g[name][:][others], reference[name][:][others])
    assert not np.isnan(g["maps"][:][others]).any()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_on_error_raise_stops_at_the_unreadable_image_keeping_earlier_units(broken, model, tmp_path, num_workers):
    out = tmp_path / "s.zarr"
    with pytest.raises(UnreadableImage, match=r"^image '.*bad.png': UnidentifiedImageError: cannot identify image file"):
        gradcam_ref.explain_dataset(model, broken, out=out, on_error="raise", **{**KW, "num_workers": num_workers})
    assert _store.done_units(out, zarr.open_group(out)) == {0, 1}


def test_a_full_disk_fails_the_unit_and_nothing_half_written_counts(images, model, reference, tmp_path, monkeypatch):
    import zarr.storage._local as local

    real_put = local._put

    def put(path, value, exclusive=False):  # the disk fills up half-way through unit 3's maps chunk
        if Path(path).parts[-5:] == ("maps", "c", "3", "0", "0"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with local._atomic_write(path, "wb") as f:
                f.write(value.as_buffer_like()[:10])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    out = tmp_path / "full.zarr"
    with pytest.raises(OSError, match="No space left on device"):
        gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert _store.done_units(out, zarr.open_group(out)) == {0, 1, 2}
    assert not [p for p in out.rglob("*.partial")]
    monkeypatch.setattr(local, "_put", real_put)
    summary = gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert (summary.skipped_units, summary.computed_units) == (3, 3)
    assert_same_store(reference, zarr.open_group(out, mode="r"))


# --- kill -9, SIGTERM, Ctrl-C (subprocesses) ----------------------------------------------------


def _start(images, out, delay=0.15, extra=()):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.dataset.run_job", str(images[0].parent), str(out), str(delay),
                             *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_units(process, out, count, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "zarr.json").exists() and len(_store.done_units(out, zarr.open_group(out, mode="r"))) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the run made no progress")


@pytest.mark.slow
def test_kill_9_loses_at_most_the_unit_in_flight_and_recomputes_no_finished_one(images, model, reference, tmp_path):
    out = tmp_path / "k.zarr"
    process = _start(images, out)
    _wait_for_units(process, out, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    done = _store.done_units(out, zarr.open_group(out))
    assert 2 <= len(done) < 6 and done == set(range(len(done)))  # one unit at a time, in order
    finished = chunk_stats(out)
    summary = gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert summary.skipped_units == len(done) and summary.computed_units == 6 - len(done)
    after = chunk_stats(out)
    assert all(after[k] == v for k, v in finished.items() if "/maps/" in "/" + k.replace(os.sep, "/"))
    assert_same_store(reference, zarr.open_group(out, mode="r"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_after_the_current_unit(images, model, reference, tmp_path, signum):
    out = tmp_path / "t.zarr"
    process = _start(images, out)
    _wait_for_units(process, out, 1)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"interrupted {signum}" in stdout and "stopping after the current unit" in stderr
    done = _store.done_units(out, zarr.open_group(out))
    assert 1 <= len(done) < 6 and not [p for p in out.rglob("*.partial")]
    summary = gradcam_ref.explain_dataset(model, images, out=out, **KW)
    assert summary.skipped_units == len(done)
    assert_same_store(reference, zarr.open_group(out, mode="r"))


def test_jax_pairs_and_array_options_are_told_apart_by_their_weights(images, tmp_path):
    """A JAX ``(features, head)`` pair is fingerprinted by the arrays its functions close over and
    read (the store recorded only their names: other weights resumed a store silently), and an array
    option by its bytes (``repr`` shortens long arrays with '...': other params were accepted)."""
    import jax
    import jax.numpy as jnp

    def pair(seed: int, scale: float = 1.0):
        kernel = jax.random.normal(jax.random.key(seed), (4, 3, 3, 3)) * scale
        weights = jax.random.normal(jax.random.key(seed + 1), (4, 5))

        def features(x):
            return jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME"))

        def head(a):
            return a.mean(axis=(2, 3)) @ weights

        return features, head

    kw = {k: v for k, v in KW.items() if k != "layer"}
    out = tmp_path / "jax.zarr"
    gradcam_ref.explain_dataset(pair(0), images[:8], out=out, shard=(0, 2), **kw)
    gradcam_ref.explain_dataset(pair(0), images[:8], out=out, shard=(1, 2), **kw)  # the same weights resume
    with pytest.raises(StoreMismatch, match=r"was made with model=.*they differ in sha256"):
        gradcam_ref.explain_dataset(pair(0, scale=2.0), images[:8], out=out, **kw)
    assert _job_array_digest(pair(0)) == _job_array_digest(pair(0))
    # every function's arrays count, the head's too (the features' closure list, freed, once lent
    # its id to the head's, which was then skipped as seen)
    features, head = pair(0)
    assert _job_array_digest((features, head)) != _job_array_digest((features, pair(1)[1]))
    assert _job_array_digest((features, head)) != _job_array_digest((pair(1)[0], head))

    params = np.zeros(5000)  # repr: 'array([0., 0., 0., ..., 0., 0., 0.])' whatever the middle holds
    other = params.copy()
    other[2500] = 5.0
    assert repr(params) == repr(other)
    assert _job_array_digest(params) != _job_array_digest(other)
    assert _job_array_digest({"w": jnp.ones(3)}) == _job_array_digest({"w": jnp.ones(3)})
    assert _job_array_digest({"w": jnp.ones(3)}) != _job_array_digest({"w": jnp.ones(3, jnp.int32)})  # dtype
    assert _job_array_digest(("no", 1, None)) is None  # nothing to hash: the class names alone


def _job_array_digest(value):
    from gradcam_ref.dataset import _job

    return _job.array_digest(value)
