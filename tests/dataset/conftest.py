"""The data set tests' shared fixtures: N tiny images, the tiny model, and the reference store."""

from __future__ import annotations

import pytest

from tests.dataset.helpers import KW, N, make_images, tiny_model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), N)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(images, model, tmp_path_factory):
    """One uninterrupted run: the store every other run must equal bit for bit."""
    import zarr

    import gradcam_ref

    out = tmp_path_factory.mktemp("ref") / "maps.zarr"
    gradcam_ref.explain_dataset(model, images, out=out, **KW)
    return zarr.open_group(out, mode="r")
