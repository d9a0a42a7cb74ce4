"""The golden vectors: they load safely, they are self-consistent, every backend reproduces them,
and they are what the generator writes."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

import gradcam_ref
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.verify import goldens, make_goldens
from gradcam_ref.verify.twins import torch_oracle

ALL = goldens.names()
ORACLE = [n for n in ALL if goldens.load(n).model == "oracle"]
EFFICIENTNET = [n for n in ALL if goldens.load(n).model == "efficientnet-lite0"]


def test_the_shipped_goldens_are_all_there_and_small():
    assert ALL == sorted(make_goldens.CASES)
    assert len(ORACLE) == 6 and len(EFFICIENTNET) == 2
    assert sum((goldens.DIRECTORY / f"{n}.npz").stat().st_size for n in ALL) < 2 * 2**20
    assert (goldens.DIRECTORY / "README.md").is_file()


@pytest.mark.parametrize("name", ALL)
def test_a_golden_is_complete_and_self_consistent(name):
    g = goldens.load(name)
    assert all(key in g for key in goldens.REQUIRED)
    assert g.description and g.rtol > 0
    a, grads = g["activations"], g["gradients"]
    n, k, *spatial = a.shape
    assert grads.shape == a.shape and g["weights"].shape == (n, k) and g["maps"].shape == (n, *spatial)
    assert g.targets.dtype == np.int64 and g.targets.shape == (n,) and g["scores"].shape[0] == n
    assert g.inputs.shape[0] == n and g.inputs.dtype == np.float64
    # Eq. 1 and Eq. 2, written out here with nothing of gradcam_ref
    tol = g.rtol * np.abs(g["maps"]).max()
    np.testing.assert_allclose(g["weights"], grads.reshape(n, k, -1).mean(-1), rtol=0, atol=g.rtol * np.abs(g["weights"]).max())
    np.testing.assert_allclose(g["maps"], np.maximum(np.einsum("nk,nk...->n...", g["weights"], a), 0), rtol=0, atol=tol)
    if "cam" in g:  # A feeds GAP -> linear: Grad-CAM == ReLU(CAM) / Z
        np.testing.assert_allclose(g["maps"], np.maximum(g["cam"], 0) / math.prod(spatial), rtol=0, atol=tol)
    assert g["maps"].max() > 0, "a golden whose maps are all zero checks little"


def test_hand_computed_goldens_hold_the_numbers_worked_out_in_the_generator():
    relu0, conv0, flat = (goldens.load(n) for n in ("tiny_gap_relu0", "tiny_gap_conv0", "tiny_flatten_1d"))
    np.testing.assert_array_equal(relu0["maps"], [[[0.125, 0.375], [0.0, 0.125]]])
    np.testing.assert_array_equal(conv0["maps"], [[[0.1875, 0.4375], [0.1875, 0.1875]]])
    np.testing.assert_array_equal(relu0["scores"], [[0.25, -0.375]])
    np.testing.assert_array_equal(flat["maps"], [[4 / 3, 0.0, 0.0], [0.0, 0.0, 2 / 3]])
    np.testing.assert_array_equal(flat.targets, [1, 0])


# --- every backend reproduces the goldens --------------------------------------------------------


def assert_explanation_matches(g: goldens.Golden, e: gradcam_ref.Explanation) -> None:
    e = e.numpy()
    for key in ("scores", "activations", "gradients", "weights", "maps"):
        diff, tolerance = g.compare(key, getattr(e, key))
        assert diff <= tolerance, f"{g.name} {key}: {diff} > {tolerance}"
    np.testing.assert_array_equal(e.targets, g.targets)


def oracle_of(g: goldens.Golden) -> Oracle:
    return Oracle(*g.oracle())


@pytest.mark.parametrize("name", ORACLE)
def test_numpy_backend_reproduces_the_oracle_goldens(name):
    g = goldens.load(name)
    assert_explanation_matches(g, gradcam_ref.explain(oracle_of(g), g.inputs, g.targets, layer=g.layer))


@pytest.mark.parametrize("name", ORACLE)
def test_torch_backend_reproduces_the_oracle_goldens(name):
    g = goldens.load(name)
    model = torch_oracle(oracle_of(g), torch.float64)
    assert_explanation_matches(g, gradcam_ref.explain(model, torch.from_numpy(g.inputs), g.targets, layer=g.layer))


@pytest.fixture(scope="module")
def efficientnet_float64():
    """The zoo's pretrained model in float64 (loaded once per session, shared with verify)."""
    from gradcam_ref import verify

    return verify._efficientnet_float64()


@pytest.mark.slow
@pytest.mark.parametrize("name", EFFICIENTNET)
def test_torch_backend_reproduces_the_efficientnet_goldens_in_float64(name, efficientnet_float64):
    g = goldens.load(name)
    options = {} if g.layer_call is None else {"call": g.layer_call}
    e = gradcam_ref.explain(efficientnet_float64, torch.from_numpy(g.inputs), g.targets, layer=g.layer, **options)
    assert_explanation_matches(g, e)
    assert int(g["scores"].argmax()) == int(g.targets[0]) == 281  # ImageNet 281: tabby cat


@pytest.mark.parametrize("name", ALL)
def test_stored_heatmaps_are_the_conventions_of_the_stored_maps(name):
    g = goldens.load(name)
    e = gradcam_ref.Explanation(maps=g["maps"], activations=g["activations"], gradients=g["gradients"],
                                weights=g["weights"], scores=g["scores"], targets=g.targets)
    assert set(g.heatmaps) >= {"paper", "captum", "torchcam", "tf-keras-vis"}
    for convention in g.heatmaps:
        size = g.heatmap_size if gradcam_ref.conventions.get_convention(convention).resizes else None
        diff, tolerance = g.compare(f"heatmap.{convention}", e.heatmap(size, convention))
        assert diff <= tolerance, convention


# --- the files are what the generator writes -------------------------------------------------------


def test_regenerating_the_numpy_goldens_gives_the_shipped_arrays(tmp_path):
    for name in make_goldens.NUMPY_ONLY:
        make_goldens.write(name, tmp_path)
        new, shipped = goldens.load(name, tmp_path), goldens.load(name)
        assert sorted(new) == sorted(shipped)
        for key in shipped:
            if shipped[key].dtype.kind in "fc":
                np.testing.assert_allclose(new[key], shipped[key], rtol=1e-13, atol=0, err_msg=f"{name} {key}")
            else:
                np.testing.assert_array_equal(new[key], shipped[key], err_msg=f"{name} {key}")


def test_the_generator_refuses_wrong_hand_answers():
    with pytest.raises(AssertionError, match=r"(?s)the oracle's maps .* != by hand"):
        make_goldens.oracle_golden("wrong", make_goldens._tiny_gap(), make_goldens.TINY_X, "relu0", [0], (4, 4),
                                   by_hand={"maps": [[[0.125, 0.375], [0.0, 0.25]]]})


# --- loading: safe, and with clear errors ------------------------------------------------------------


def test_loading_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    shutil.copy(goldens.DIRECTORY / "tiny_gap_relu0.npz", path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["description"] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **arrays)  # an object array: only pickle can read it back
    with pytest.raises(ValueError, match=r"golden .*evil.npz is not an .npz of plain numeric and string arrays "
                                         r"\(read with allow_pickle=False\): Object arrays cannot be loaded"):
        goldens.load(path)
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(ValueError, match=r"junk.npz is not an .npz of plain"):
        goldens.load(tmp_path / "junk.npz")


def test_bad_goldens_are_refused_with_the_reason(tmp_path):
    with np.load(goldens.DIRECTORY / "tiny_gap_relu0.npz") as data:
        arrays = dict(data)
    np.savez(tmp_path / "no_maps.npz", **{k: v for k, v in arrays.items() if k != "maps"})
    with pytest.raises(ValueError, match=r"lacks the entries \['maps'\]"):
        goldens.load("no_maps", tmp_path)
    np.savez(tmp_path / "v2.npz", **{**arrays, "format": np.array("gradcam-ref-golden/2")})
    with pytest.raises(ValueError, match=r"has format 'gradcam-ref-golden/2', expected 'gradcam-ref-golden/1'"):
        goldens.load("v2", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no golden 'nope' .* goldens there: \['no_maps', 'v2'\]"):
        goldens.load("nope", tmp_path)
    with pytest.raises(KeyError, match=r"golden 'tiny_gap_relu0' has no entry 'cams'"):
        goldens.load("tiny_gap_relu0")["cams"]
    with pytest.raises(ValueError, match=r"holds a 'efficientnet-lite0' case, not an oracle network"):
        goldens.load("efficientnet_lite0_head").oracle()


def test_compare_scales_the_tolerance_and_never_passes_nan_or_a_wrong_shape():
    g = goldens.load("tiny_gap_relu0")  # maps max .375, rtol 1e-12
    assert g.compare("maps", g["maps"]) == (0.0, 0.375e-12)
    assert g.compare("maps", g["maps"] + 1e-9)[0] == pytest.approx(1e-9)
    assert g.compare("maps", np.full_like(g["maps"], np.nan))[0] == math.inf
    assert g.compare("maps", g["maps"][0])[0] == math.inf
