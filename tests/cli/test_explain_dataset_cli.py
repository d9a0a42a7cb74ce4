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
