"""explain_dataset(metrics=...): the data set explained and scored in one pass, the scores written with the maps.

Every stored value must be what gradcam_ref.evaluate gives on the same unit's stored maps (upsampled
to the input), inputs, targets and masks/boxes, to the bit; resuming keeps them; bad input is named.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr

import gradcam_ref
from gradcam_ref._evaluate import FAITHFULNESS, LOCALISATION
from gradcam_ref.dataset import Preprocess, StoreMismatch, _store
from tests.dataset.helpers import KW, SIZE, N, box_of, mask_of
from tests.dataset.run_job import METRICS
from tests.dataset.test_explain_dataset import _start, _wait_for_units, chunk_stats

OPTIONS = {"steps": 6, "batch_size": 8, "seed": 3}
ALL = LOCALISATION + FAITHFULNESS


@pytest.fixture(scope="module")
def boxes(images):
    return np.array([box_of(str(p)) for p in images])


@pytest.fixture(scope="module")
def scored(images, model, boxes, tmp_path_factory):
    """Every metric, boxes as an array (its masks are the boxes'), one uninterrupted run."""
    out = tmp_path_factory.mktemp("scored") / "maps.zarr"
    summary = gradcam_ref.explain_dataset(model, images, out=out, metrics=ALL, boxes=boxes, metric_options=OPTIONS,
                                          **KW)
    assert summary.computed_units == 6
    return zarr.open_group(out, mode="r")


def inputs_of(paths):
    load = Preprocess((SIZE, SIZE))
    return np.stack([load(str(p)) for p in paths])


def evaluate_unit(group, model, paths, rows, names, **ground_truth):
    """gradcam_ref.evaluate on rows ``rows`` of the store, as a user would run it after the pass."""
    maps = group["maps"][rows]
    targets = group["targets"][rows]
    t = 1 if targets.ndim == 1 else targets.shape[1]
    upsampled = np.asarray(gradcam_ref.upsample(maps, (SIZE, SIZE))).reshape(len(rows) * t, SIZE, SIZE)
    faithfulness = [m for m in names if m in FAITHFULNESS]
    kwargs = {k: np.repeat(v, t, axis=0) for k, v in ground_truth.items()}
    if faithfulness:
        kwargs.update(score=gradcam_ref.metrics.scorer(model), inputs=np.repeat(inputs_of(paths[r] for r in rows), t, 0),
                      targets=targets.reshape(-1), **OPTIONS)
    result = gradcam_ref.evaluate(upsampled, faithfulness=faithfulness, **kwargs)
    return {name: result.values[name].reshape(targets.shape) for name in names}


def units(n=N, batch=4):
    return [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]


def test_every_stored_metric_is_evaluate_on_the_units_stored_maps_to_the_bit(scored, images, model, boxes):
    assert sorted(scored["metrics"].array_keys()) == sorted(ALL)
    for rows in units():
        expected = evaluate_unit(scored, model, images, rows, ALL, boxes=boxes[rows])
        for name in ALL:
            got = scored[f"metrics/{name}"][rows]
            assert got.dtype == np.float64 and got.shape == (len(rows),), name
            assert np.array_equal(got, expected[name], equal_nan=True), (name, rows, got, expected[name])
    assert scored["metrics/deletion"].chunks == (4,)
    values = {name: scored[f"metrics/{name}"][:] for name in ALL}
    assert np.isfinite(values["deletion"]).all() and np.isfinite(values["relevance_mass"]).all()
    assert ((values["pointing_game"] >= 0) & (values["pointing_game"] <= 1)).all()  # ties share the hit
    assert values["deletion"].std() > 0  # distinct images, distinct values (not one number broadcast)
    settings = scored.attrs["gradcam_ref"]["metrics"]
    assert settings["names"] == sorted(ALL)
    assert settings["options"] == {"steps": 6, "batch_size": 8, "seed": 3, "road_percentages": [10, 30, 50, 70, 90]}
    assert settings["boxes"]["shape"] == [N, 4] and len(settings["boxes"]["sha256"]) == 64


def test_masks_from_a_callable_and_two_targets_per_image(images, model, tmp_path):
    names = ("relevance_mass", "relevance_rank", "insertion", "increase_in_confidence")
    out = tmp_path / "t.zarr"
    gradcam_ref.explain_dataset(model, images[:8], out=out, target=[1, 3], metrics=names, masks=mask_of,
                                metric_options=OPTIONS, **KW)
    g = zarr.open_group(out, mode="r")
    masks = np.stack([mask_of(str(p)) for p in images[:8]])
    for rows in units(8):
        expected = evaluate_unit(g, model, images, rows, names, masks=masks[rows])
        for name in names:
            got = g[f"metrics/{name}"][rows]
            assert got.shape == (len(rows), 2)
            assert np.array_equal(got, expected[name], equal_nan=True), name
    # Target 1 and target 3 are scored as different examples: the columns differ.
    assert not np.array_equal(g["metrics/insertion"][:, 0], g["metrics/insertion"][:, 1])


def test_an_unreadable_image_gets_nan_and_its_unit_is_scored_without_it(images, model, boxes, tmp_path):
    paths = list(images)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths[9] = bad
    names = ("deletion", "pointing_game", "average_drop")
    out = tmp_path / "b.zarr"
    summary = gradcam_ref.explain_dataset(model, paths, out=out, metrics=names, boxes=boxes, metric_options=OPTIONS,
                                          **KW)
    assert len(summary.failed) == 1
    g = zarr.open_group(out, mode="r")
    for name in names:
        assert np.isnan(g[f"metrics/{name}"][9])
    rows = [8, 10, 11]  # unit 2 less the unreadable image
    expected = evaluate_unit(g, model, paths, rows, names, boxes=boxes[rows])
    for name in names:
        assert np.array_equal(g[f"metrics/{name}"][rows], expected[name]), name


def test_an_all_unreadable_unit_is_all_nan(images, model, boxes, tmp_path):
    paths = list(images[:8])
    for i in range(4, 8):
        paths[i] = tmp_path / f"bad{i}.png"
        paths[i].write_bytes(b"no")
    gradcam_ref.explain_dataset(model, paths, out=tmp_path / "a.zarr", metrics=("deletion", "relevance_mass"),
                                boxes=boxes[:8], metric_options=OPTIONS, **KW)
    g = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert np.isnan(g["metrics/deletion"][4:]).all() and np.isfinite(g["metrics/deletion"][:4]).all()


def test_resume_keeps_the_scores_and_ends_equal_to_one_run(scored, images, model, boxes, tmp_path):
    out = tmp_path / "r.zarr"
    kwargs = {"metrics": ALL, "boxes": boxes, "metric_options": OPTIONS, **KW}
    gradcam_ref.explain_dataset(model, images, out=out, shard=(1, 2), **kwargs)
    finished = chunk_stats(out)
    assert any("metrics/deletion/c/" in k.replace(os.sep, "/") for k in finished)
    second = gradcam_ref.explain_dataset(model, images, out=out, **kwargs)
    assert (second.skipped_units, second.computed_units) == (3, 3)
    assert all(chunk_stats(out)[k] == v for k, v in finished.items())  # not one finished chunk rewritten
    g = zarr.open_group(out, mode="r")
    for name in [*(f"metrics/{m}" for m in ALL), "maps", "targets"]:
        assert np.array_equal(g[name][:], scored[name][:], equal_nan=True), name


@pytest.mark.slow
def test_kill_9_then_resume_keeps_the_finished_scores(images, model, tmp_path):
    """A run scoring in the same pass, killed: the rerun scores only the units not finished."""
    out = tmp_path / "k.zarr"
    process = _start(images, out, delay=0.15, extra=["metrics"])
    _wait_for_units(process, out, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    done = _store.done_units(out, zarr.open_group(out))
    assert 2 <= len(done) < 6
    before = zarr.open_group(out, mode="r")
    kept = {m: before[f"metrics/{m}"][:4 * len(done)] for m in METRICS["metrics"]}
    finished = {k: v for k, v in chunk_stats(out).items()
                if any(f"/c/{u}" in "/" + k.replace(os.sep, "/") for u in done)}
    summary = gradcam_ref.explain_dataset(model, images, out=out, **METRICS, **KW)
    assert (summary.skipped_units, summary.computed_units) == (len(done), 6 - len(done))
    after = chunk_stats(out)
    assert all(after[k] == v for k, v in finished.items())
    reference = tmp_path / "ref.zarr"
    gradcam_ref.explain_dataset(model, images, out=reference, **METRICS, **KW)
    g, r = zarr.open_group(out, mode="r"), zarr.open_group(reference, mode="r")
    for m in METRICS["metrics"]:
        assert np.array_equal(g[f"metrics/{m}"][:4 * len(done)], kept[m])
        assert np.array_equal(g[f"metrics/{m}"][:], r[f"metrics/{m}"][:]), m
        assert np.isfinite(g[f"metrics/{m}"][:]).all()


@pytest.mark.parametrize("change, differ", [
    ({"metrics": ("pointing_game", "deletion")},
     r"names \(\[\"deletion\", \"relevance_mass\"\] vs \[\"deletion\", \"pointing_game\"\]\)"),
    ({"metric_options": {"steps": 7}}, r"options \(.*\"steps\": 6.* vs .*\"steps\": 7.*\)"),
    ({"boxes": "shifted"}, r"boxes \(.*\)"),
    ({"metrics": (), "boxes": None}, r", not null; they differ in .*names \(\[\"deletion\", \"relevance_mass\"\] vs null\)"),
])
def test_resuming_with_other_metrics_is_an_error_naming_the_difference(images, model, boxes, tmp_path, change, differ):
    out = tmp_path / "m.zarr"
    base = {"metrics": ("deletion", "relevance_mass"), "boxes": boxes, "metric_options": {"steps": 6}}
    gradcam_ref.explain_dataset(model, images, out=out, shard=(0, 3), **base, **KW)
    before = chunk_stats(out)
    changed = {**base, **change}
    if change.get("boxes") == "shifted":  # one box one pixel narrower
        changed["boxes"] = boxes.copy()
        changed["boxes"][0, 2] = boxes[0, 2] - 1 if boxes[0, 2] - boxes[0, 0] > 1 else boxes[0, 2] + 1
    with pytest.raises(StoreMismatch, match=rf"^out='.*m.zarr' was made with metrics=.*{differ}.*: resume with the same"):
        gradcam_ref.explain_dataset(model, images, out=out, **changed, **KW)
    assert chunk_stats(out) == before


def test_resuming_a_store_without_metrics_with_metrics_is_an_error(images, model, boxes, tmp_path):
    out = tmp_path / "plain.zarr"
    gradcam_ref.explain_dataset(model, images[:4], out=out, **KW)
    with pytest.raises(StoreMismatch, match=r"was made with metrics=null, not \{.*; they differ in .*names \(null vs \[\"pointing_game\"\]\)"):
        gradcam_ref.explain_dataset(model, images[:4], out=out, metrics=["pointing_game"], boxes=boxes[:4], **KW)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metrics": ["deletion", "iou"]}, ValueError, r"metrics must name metrics among \(.*\), got \['iou'\]"),
    ({"metrics": "deletion"}, TypeError, "metrics must be a sequence of metric names, got 'deletion'"),
    ({"metrics": ["pointing_game"]}, ValueError,
     r"metrics=\['pointing_game'\] need masks= or boxes= \(the images' ground truth\), got neither"),
    ({"metrics": ["weakly_supervised_localisation"], "masks": "ok"}, ValueError,
     r"metrics=\['weakly_supervised_localisation'\] needs boxes=, got None"),
    ({"metrics": ["deletion"], "boxes": "ok"}, ValueError,
     r"boxes= is given but metrics=\['deletion'\] names no localisation metric"),
    ({"metrics": ["pointing_game"], "boxes": np.zeros((N - 1, 4), int)}, ValueError,
     rf"boxes must be a callable or an array-like of shape \({N}, 4\) \(one row per image\), got ndarray of shape "
     rf"\({N - 1}, 4\)"),
    ({"metrics": ["pointing_game"], "masks": np.ones((N, SIZE, SIZE - 1), bool)}, ValueError,
     rf"masks must be at the model's input size \(N, {SIZE}, {SIZE}\), got shape \({N}, {SIZE}, {SIZE - 1}\)"),
    ({"metrics": ["pointing_game"], "boxes": "outside"}, ValueError,
     rf"boxes must be integers with 0 <= x0 < x1 <= {SIZE}, 0 <= y0 < y1 <= {SIZE} \(input pixels\); rows \[5\] "
     rf"are not: \[\[0, 0, {SIZE + 1}, 4\]\]"),
    ({"metrics": ["deletion"], "metric_options": {"step": 5}}, ValueError,
     r"metric_options takes \['batch_size', 'road_percentages', 'seed', 'steps'\], got \['step'\]"),
    ({"metrics": ["deletion"], "metric_options": {"steps": 0}}, ValueError,
     r"metric_options\['steps'\] must be a positive int, got 0"),
])
def test_bad_metric_arguments_are_named_before_any_work(images, model, boxes, tmp_path, kwargs, error, message):
    kwargs = dict(kwargs)
    for key in ("masks", "boxes"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = {"ok": mask_of if key == "masks" else boxes, "outside": boxes.copy()}[kwargs[key]]
    if isinstance(kwargs.get("boxes"), np.ndarray) and kwargs["boxes"].shape == (N, 4) and kwargs["boxes"] is not boxes:
        kwargs["boxes"][5] = [0, 0, SIZE + 1, 4]
    with pytest.raises(error, match=f"^{message}"):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / "bad.zarr", **kwargs, **KW)
    assert not (tmp_path / "bad.zarr").exists()


def test_a_hook_metric_named_like_a_named_metric_is_refused(images, model, boxes, tmp_path):
    def evaluate(model_, inputs, explanation):
        return {"deletion": explanation.maps.flatten(1).amax(1)}

    with pytest.raises(ValueError, match=r"evaluate returned \['deletion'\], which metrics= also names"):
        gradcam_ref.explain_dataset(model, images[:4], out=tmp_path / "h.zarr", evaluate=evaluate,
                                    metrics=["deletion"], **KW)
    assert not Path(tmp_path / "h.zarr").exists()


def test_masks_from_a_zarr_array_read_a_unit_at_a_time_equal_masks_from_numpy(images, model, tmp_path):
    masks = np.stack([mask_of(str(p)) for p in images])
    on_disk = zarr.open_array(tmp_path / "masks.zarr", mode="w", shape=masks.shape, chunks=(5, SIZE, SIZE),
                              dtype=bool)
    on_disk[:] = masks
    names = ("relevance_mass", "localisation_auc")
    for source, out in ((masks, "n.zarr"), (zarr.open_array(tmp_path / "masks.zarr", mode="r"), "z.zarr")):
        gradcam_ref.explain_dataset(model, images, out=tmp_path / out, metrics=names, masks=source, **KW)
    a, b = zarr.open_group(tmp_path / "n.zarr", mode="r"), zarr.open_group(tmp_path / "z.zarr", mode="r")
    for name in names:
        assert np.array_equal(a[f"metrics/{name}"][:], b[f"metrics/{name}"][:]), name
        assert np.isfinite(a[f"metrics/{name}"][:]).all()
    assert b.attrs["gradcam_ref"]["metrics"]["masks"]["shape"] == [N, SIZE, SIZE]
