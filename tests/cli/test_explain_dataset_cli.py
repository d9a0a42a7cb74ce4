"""``gradcam-ref explain-dataset``: the store of the API, resume, shards, one-line errors."""

from __future__ import annotations

import pytest
import zarr  # noqa: E402

import gradcam_ref  # noqa: E402
from gradcam_ref.cli import main  # noqa: E402
from tests.dataset.helpers import SIZE, make_images, tiny_model  # noqa: E402
from tests.dataset.test_explain_dataset import KW, assert_same_store  # noqa: E402

BASE = ["--model", "tests.dataset.helpers:tiny_model", "--layer", "2", "--size", str(SIZE), "--batch-size", "4",
        "--num-workers", "0", "--threads", "1", "--quiet", "--mean", "0.485,0.456,0.406",
        "--std", "0.229,0.224,0.225"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 10)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_the_command_writes_the_apis_store_and_resumes(folder, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["explain-dataset", str(folder), "--out", str(out), *BASE]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("done: 3 units (11 images) computed in") and "1 unreadable images" in printed
    assert f"unreadable: {folder / 'broken.png'}: UnidentifiedImageError" in printed
    gradcam_ref.explain_dataset(tiny_model(), folder, out=tmp_path / "api.zarr", **KW)
    assert_same_store(zarr.open_group(tmp_path / "api.zarr", mode="r"), zarr.open_group(out, mode="r"))

    assert main(["explain-dataset", str(folder), "--out", str(out), *BASE]) == 2
    assert "exists; add --resume to continue it" in capsys.readouterr().err
    assert main(["explain-dataset", str(folder), "--out", str(out), "--resume", *BASE]) == 0
    assert capsys.readouterr().out.startswith("done: 0 units (0 images) computed")
    assert main(["explain-dataset", str(folder), "--out", str(out), "--resume", *BASE, "--mean", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradcam-ref explain-dataset: error: out=") and "was made with preprocess=" in err
    assert err.count("\n") == 1


def test_shards_and_bad_shards(folder, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(["explain-dataset", str(folder), "--out", str(out), "--shard", "1/3", *BASE]) == 0
    assert capsys.readouterr().out.startswith("done: 1 units (4 images)")
    assert main(["explain-dataset", str(folder), "--out", str(tmp_path / "t.zarr"), "--shard", "3/3", *BASE]) == 2
    assert "shard must be (i, n) or 'i/n' with 0 <= i < n, got '3/3'" in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()


# --- metrics in the same pass ---------------------------------------------------------------------


def test_metrics_with_boxes_in_the_images_own_pixels(folder, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from gradcam_ref.cli.dataset import ImageBoxes

    images = sorted(folder.glob("*.png"))
    table = {"000.png": [1, 2, 7, 9]}
    for path in images[1:]:
        if path.name != "broken.png":
            with Image.open(path) as image:
                w, h = image.size
            table[path.name] = [0, 1, w - 1, h]
    table["broken.png"] = [0, 0, 1, 1]
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(table))
    # 000.png is 14 x 12 (W x H), the input 16 x 16: x * 16/14, y * 16/12, start floored, end ceiled.
    scaled = ImageBoxes(table, str(boxes_file), folder, (SIZE, SIZE))
    assert scaled(str(folder / "000.png")) == [1, 2, 8, 12]
    out = tmp_path / "m.zarr"
    metrics = "deletion,pointing_game,relevance_mass"
    assert main(["explain-dataset", str(folder), "--out", str(out), "--metrics", metrics, "--boxes", str(boxes_file),
                 "--steps", "5", "--metric-batch-size", "8", *BASE]) == 0
    printed = capsys.readouterr().out
    assert "metrics (whole store):\n  deletion: mean " in printed and "over 10 values (1 NaN)" in printed

    paths = gradcam_ref.dataset.list_images(folder)
    boxes = np.array([[0, 0, 1, 1] if p.endswith("broken.png") else scaled(p) for p in paths])
    gradcam_ref.explain_dataset(tiny_model(), folder, out=tmp_path / "api.zarr", metrics=metrics.split(","),
                                boxes=boxes, metric_options={"steps": 5, "batch_size": 8}, **KW)
    cli, api = zarr.open_group(out, mode="r"), zarr.open_group(tmp_path / "api.zarr", mode="r")
    assert_same_store(api, cli)
    for name in metrics.split(","):
        assert np.array_equal(cli[f"metrics/{name}"][:], api[f"metrics/{name}"][:], equal_nan=True), name
    assert cli.attrs["gradcam_ref"]["metrics"]["boxes"]["sha256"] == scaled.sha256

    # Resuming with another steps count names the difference, in one line.
    assert main(["explain-dataset", str(folder), "--out", str(out), "--resume", "--metrics", metrics,
                 "--boxes", str(boxes_file), "--steps", "6", *BASE]) == 2
    err = capsys.readouterr().err
    assert "was made with metrics=" in err and '"steps": 5' in err and '"steps": 6' in err and err.count("\n") == 1


def test_metrics_with_mask_files(folder, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    expected = {}
    for path in folder.glob("*.png"):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[2:9, 3:3 + len(path.stem)] = 255
        Image.fromarray(mask).save(masks_dir / path.name)
        expected[path.name] = mask > 0
    out = tmp_path / "k.zarr"
    assert main(["explain-dataset", str(folder), "--out", str(out), "--metrics", "relevance_rank",
                 "--masks", str(masks_dir), *BASE]) == 0
    capsys.readouterr()
    paths = gradcam_ref.dataset.list_images(folder)
    masks = np.stack([expected[p.rsplit("/", 1)[1]] for p in paths])
    gradcam_ref.explain_dataset(tiny_model(), folder, out=tmp_path / "api.zarr", metrics=["relevance_rank"],
                                masks=masks, **KW)
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["metrics/relevance_rank"][:],
                                  zarr.open_group(tmp_path / "api.zarr", mode="r")["metrics/relevance_rank"][:])


@pytest.mark.parametrize("options, message", [
    (["--boxes", "b.json"], "--boxes need --metrics"),
    (["--metrics", "deletion,iou"], "metrics must name metrics among"),
    (["--metrics", "pointing_game", "--boxes", "{tmp}/none.json"], "cannot read a JSON object of boxes"),
    (["--metrics", "pointing_game", "--boxes", "{tmp}/few.json"], "has no box for 10 images, e.g. "),
    (["--metrics", "pointing_game", "--masks", "{tmp}"], "has no mask for 11 images, e.g. "),
])
def test_metric_options_errors(folder, tmp_path, capsys, options, message):
    (tmp_path / "few.json").write_text('{"000.png": [0, 0, 2, 2]}')
    options = [o.format(tmp=tmp_path) for o in options]
    assert main(["explain-dataset", str(folder), "--out", str(tmp_path / "e.zarr"), *options, *BASE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradcam-ref explain-dataset: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "e.zarr").exists()
