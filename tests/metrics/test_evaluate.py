"""gradcam_ref.evaluate and ``gradcam-ref evaluate``: the same numbers as the metrics, a table, atomic JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gradcam_ref
from gradcam_ref import cli, metrics, viz
from gradcam_ref.cli import _common as common
from gradcam_ref.zoo import IMAGENET_MEAN, IMAGENET_STD
from tests.cli.test_cli import SIZE, tiny_net
from tests.metrics.test_faithfulness import linear


def test_evaluate_is_the_metrics_put_together(tmp_path):
    rng = np.random.default_rng(0)
    x, heat = rng.standard_normal((3, 2, 4, 4)), rng.random((3, 4, 4))
    boxes = np.array([[0, 0, 2, 2], [1, 1, 4, 3], [2, 0, 4, 4]])
    t = np.array([0, 1, 2])
    result = gradcam_ref.evaluate(heat, boxes=boxes, score=linear, inputs=x, targets=t, steps=4,
                                  faithfulness=("deletion", "insertion", "average_drop", "road_morf"),
                                  road_percentages=(25, 50))
    masks = metrics.boxes_to_masks(boxes, (4, 4))
    np.testing.assert_array_equal(result.values["relevance_mass"], metrics.relevance_mass(heat, masks))
    np.testing.assert_array_equal(result.values["weakly_supervised_localisation"],
                                  metrics.weakly_supervised_localisation(heat, boxes))
    np.testing.assert_array_equal(result.values["deletion"], metrics.deletion(linear, x, heat, t, steps=4).auc)
    np.testing.assert_array_equal(result.values["road_morf"],
                                  metrics.road(linear, x, heat, t, percentages=(25, 50)).scores.mean(axis=1))
    unit = (heat - heat.min(axis=(1, 2), keepdims=True)) / np.ptp(heat, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.values["average_drop"], metrics.average_drop(linear, x, unit, t), atol=1e-15)
    table = result.table()
    assert table.splitlines()[0].split() == ["metric", "mean", "std", "n", "better"]
    assert f"{result.values['deletion'].mean():.4f}" in table
    path = tmp_path / "deep" / "result.json"
    result.save(path)
    saved = json.loads(path.read_text())
    assert saved["values"]["deletion"] == result.values["deletion"].tolist()
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="nothing to evaluate"):
        gradcam_ref.evaluate(heat)
    with pytest.raises(ValueError, match="faithfulness must name metrics among"):
        gradcam_ref.evaluate(heat, score=linear, inputs=x, targets=t, faithfulness=("deletions",))


def test_undefined_values_are_counted_not_averaged():
    heat = np.random.default_rng(1).random((2, 4, 4))
    heat[1] = 0.0
    with pytest.warns(gradcam_ref.MetricWarning):
        result = gradcam_ref.evaluate(heat, masks=np.ones((2, 4, 4), bool) & (np.arange(4) < 2))
    summary = result.summary()["relevance_mass"]
    assert summary["n"] == 1 and summary["undefined"] == 1
    assert summary["mean"] == result.values["relevance_mass"][0]
    assert "1 (1 NaN)" in result.table()
    assert json.loads(json.dumps(result.to_json()))["values"]["relevance_mass"][1] is None


def test_the_command_line_on_a_factory_model(capsys, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [0, 0, 30, 20], "b.png": [8, 8, 24, 24]}))
    torch.manual_seed(1)
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_net().eval().state_dict(), weights)
    out = tmp_path / "result.json"
    status = cli.main(["evaluate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--boxes",
                       str(tmp_path / "boxes.json"), "--model", "tests.cli.test_cli:tiny_net", "--weights", str(weights),
                       "--layer", "conv", "--size", str(SIZE), "--steps", "8", "--json", str(out), "--quiet",
                       "--target", "1", "--faithfulness", "deletion,region_perturbation_morf"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "gradcam", "gradcam++", "better"]
    saved = json.loads(out.read_text())
    assert [e["box"] for e in saved["examples"]] == [[0, 0, 16, 16], [8, 8, 24, 24]]  # a.png scaled 32/60, 32/40
    assert saved["elapsed_s"] > 0 and set(saved["load_average"]) == {"start", "end"}  # the run's timing line
    assert all(len(v) == 3 and min(v) >= 0 for v in saved["load_average"].values())
    # The same numbers from the library on the same inputs.
    model = tiny_net()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    images = [viz.load_image(tmp_path / n) for n in ("a.png", "b.png")]
    batch = common.preprocess(images, (SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD)
    e = gradcam_ref.explain(model, torch.from_numpy(batch), 1, layer="conv").numpy()
    maps = np.asarray(gradcam_ref.upsample(e.maps, (SIZE, SIZE)))
    boxes = np.array([[0, 0, 16, 16], [8, 8, 24, 24]])
    np.testing.assert_allclose(saved["methods"]["gradcam"]["values"]["relevance_mass"],
                               metrics.relevance_mass(maps, metrics.boxes_to_masks(boxes, (SIZE, SIZE))), atol=1e-12)
    deletion = metrics.deletion(metrics.scorer(model), batch, maps, [1, 1], steps=8).auc
    np.testing.assert_allclose(saved["methods"]["gradcam"]["values"]["deletion"], deletion, atol=1e-6)


def test_the_command_line_refuses_bad_input(capsys, tmp_path):
    assert cli.main(["evaluate", "--methods", "scorecam", "--demo"]) == 2
    assert "--methods takes comma-separated names among gradcam, gradcam++, grad-cam, grad-cam++, hirescam" in (
        capsys.readouterr().err)
    assert cli.main(["evaluate", str(tmp_path / "a.png")]) == 2
    assert "give --demo, or IMAGE... with --boxes FILE.json" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["score-cam", "ablation-cam"])
def test_a_repeated_input_is_explained_once_for_all_targets(method, monkeypatch):
    """The demo's collage (one input, one example per target): Score-CAM/Ablation-CAM run once, with
    (1, N) targets, and give the maps of the repeated batch (up to float32 rounding)."""
    from gradcam_ref.cli import _torch as torch_cli
    from gradcam_ref.cli import evaluate

    torch.manual_seed(2)
    loaded = torch_cli.load("tests.cli.test_cli:tiny_net", layer="conv", device="cpu")
    image = np.random.default_rng(3).standard_normal((1, 3, SIZE, SIZE))
    batch, targets = np.repeat(image, 3, axis=0), np.array([2, 0, 1])
    calls = []
    explain = torch_cli.explain
    monkeypatch.setattr(torch_cli, "explain", lambda *a, **k: calls.append(a[1].shape) or explain(*a, **k))
    once = evaluate._explain(torch_cli, loaded, batch, targets, method)
    assert calls == [(1, 3, SIZE, SIZE)]
    repeated = explain(loaded, batch, targets, method=method)
    assert once.maps.shape == repeated.maps.shape == (3, *repeated.maps.shape[1:])
    np.testing.assert_allclose(once.maps, repeated.maps, rtol=1e-5, atol=1e-6 * np.abs(repeated.maps).max())
    assert np.ptp(repeated.maps.reshape(3, -1), axis=1).min() > 0  # three real, distinct maps
    assert not np.allclose(repeated.maps[0], repeated.maps[1])
    calls.clear()
    evaluate._explain(torch_cli, loaded, batch[:2] + np.array([0.0, 1.0])[:, None, None, None], targets[:2], method)
    assert calls == [(2, 3, SIZE, SIZE)]  # different inputs: explained as they are
    sizes: list[int] = []  # --batch-size reaches the perturbed copies' forwards
    hook = loaded.model.fc.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    small = evaluate._explain(torch_cli, loaded, batch, targets, method, batch_size=3)
    hook.remove()
    assert sizes[0] == 1 and sizes[1:] == [3, 1]  # the capture, then the 4 channels' copies by 3
    np.testing.assert_allclose(small.maps, once.maps, rtol=1e-5, atol=1e-6 * np.abs(once.maps).max())
