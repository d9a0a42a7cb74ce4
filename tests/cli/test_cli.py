"""The gradcam-ref command line: help, the demo end to end, explain on a test model, every error case."""

from __future__ import annotations

import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import gradcam_ref
from gradcam_ref import cli, viz
from gradcam_ref import zoo as imagenet
from gradcam_ref.cli import _common as common
from gradcam_ref.cli import _options as options
from gradcam_ref.cli import demo
from gradcam_ref.cli import explain as explain_command
from gradcam_ref.zoo import efficientnet_lite0 as zoo

SIZE = 32  # the test model's input: 32 x 32, A is 4 x 8 x 8 after the stride-4 convolution


def tiny_net() -> nn.Module:
    """The test model factory: conv (stride 4) -> ReLU -> GAP -> linear, 3 classes, random init."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, stride=4, padding=1),
        relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(4, 3),
    ))


def not_a_module() -> str:
    return "a string"


class Arbitrary:
    """An object torch.load(weights_only=True) must refuse to unpickle."""


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_usage_error(status, err, *fragments):
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("gradcam-ref explain: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def setup(tmp_path):
    """Three images (two formats, a grey one, two sizes), a weights file and a labels file."""
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(images / "b.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / "c.bmp")
    torch.manual_seed(1)
    trained = tiny_net().eval()
    weights = tmp_path / "tiny.pt"
    torch.save(trained.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("red thing\ngreen thing\nblue thing\n")
    base = ["explain", "--model", "tests.cli.test_cli:tiny_net", "--weights", weights, "--layer", "conv",
            "--size", SIZE, "--labels", labels]
    return {"images": sorted(images.iterdir()), "trained": trained, "weights": weights, "base": base,
            "out": tmp_path / "out", "tmp": tmp_path}


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # written out: the expectation must not read the CLI's constants
IMAGENET_STD = (0.229, 0.224, 0.225)


def by_hand(paths, size=(SIZE, SIZE), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The batch the CLI should build, by Pillow and NumPy alone (none of the CLI's code): RGB,
    bicubic resize of the whole image to ``size`` (H, W), [0, 1], standardised, channels first."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        x = np.asarray(rgb, dtype=np.float32) / np.float32(255)
        rows.append(((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(rows))


def expected_maps(model, paths, target=None, layer="conv", **options):
    """Grad-CAM of ``model`` on the files, preprocessed by hand (:func:`by_hand`), via the library."""
    batch = by_hand(paths, **{k: options.pop(k) for k in ("size", "mean", "std") if k in options})
    return gradcam_ref.explain(model, batch, target, layer=layer, **options).numpy()


def test_the_hand_made_batch_is_what_the_cli_feeds_the_model(setup):
    """Cross-check of the two pipelines, and of the hand-made one against torchvision's transforms."""
    from torchvision import transforms

    paths = setup["images"]
    cli_batch = common.preprocess([viz.load_image(p) for p in paths], (SIZE, SIZE), imagenet.IMAGENET_MEAN,
                                  imagenet.IMAGENET_STD)
    np.testing.assert_allclose(cli_batch, by_hand(paths).numpy(), rtol=0, atol=1e-6)
    pipeline = transforms.Compose([
        transforms.Resize((SIZE, SIZE), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            np.testing.assert_allclose(pipeline(image.convert("RGB")).numpy(), cli_batch[i], rtol=0, atol=1e-5)
    # Swapped mean and std, or BGR, would be seen:
    assert not np.allclose(by_hand(paths, mean=IMAGENET_STD, std=IMAGENET_MEAN).numpy(), cli_batch, atol=1e-2)
    assert not np.allclose(cli_batch[:, ::-1], cli_batch, atol=1e-2)


# --- help and parsing --------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["explain", "--help"]])
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gradcam-ref")


def test_python_dash_m_runs_the_command():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "gradcam_ref.cli", "explain", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: gradcam-ref explain"), done.stderr
    bad = subprocess.run([sys.executable, "-m", "gradcam_ref.cli", "explain"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") <= 2 and "error:" in bad.stderr


@pytest.mark.parametrize("argv", [[], ["explain"], ["explain", "x.png", "--batch-size", "0"],
                                  ["explain", "x.png", "--alpha", "2"], ["explain", "x.png", "--size", "3x"]])
def test_bad_arguments_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "error:" in err


def test_class_names_are_the_standard_imagenet_order():
    names = common.class_names()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[281], names[282], names[285], names[999]) == (
        "tench", "tabby", "tiger cat", "Egyptian cat", "toilet tissue")


def test_parse_target():
    names = common.class_names()
    assert common.parse_target("auto", names) is None
    assert common.parse_target("281", names) == 281
    assert common.parse_target("tiger_cat", names) == 282
    assert common.parse_target("egyptian  CAT", names) == 285
    with pytest.raises(common.UsageError, match="did you mean.*'tabby'"):
        common.parse_target("tabbby", names)
    with pytest.raises(common.UsageError, match=">= 0"):
        common.parse_target("-1", names)


def test_small_helpers():
    assert common.peak_of(np.array([[0.0, 1.0], [1.0, 0.5]])) == (0, 1)
    assert common.in_words(0, 0, (9, 9)) == "upper left"
    assert common.in_words(4, 4, (9, 9)) == "centre"
    assert common.in_words(8, 4, (9, 9)) == "lower centre"
    heat = np.zeros((4, 4))
    heat[0, 3], heat[3, 0] = 3.0, 1.0
    np.testing.assert_allclose(demo.tile_shares(heat, 2, 2), [0.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(common.softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
    paths = [Path("x/a.png"), Path("y/a.jpg"), Path("a-2.png"), Path("b.png")]
    assert explain_command._unique_stems(paths) == ["a", "a-2", "a-2-2", "b"]


def test_staged_output_moves_files_only_on_success(tmp_path):
    out = tmp_path / "new" / "out"
    with common.staged_output(out) as stage:
        (stage / "a.txt").write_text("a")
    assert sorted(os.listdir(out)) == ["a.txt"]
    with pytest.raises(RuntimeError), common.staged_output(out) as stage:
        (stage / "b.txt").write_text("b")
        raise RuntimeError
    assert sorted(os.listdir(out)) == ["a.txt"]  # kept what was there, added nothing
    fresh = tmp_path / "fresh" / "deeper"
    with pytest.raises(RuntimeError), common.staged_output(fresh):
        raise RuntimeError
    assert not (tmp_path / "fresh").exists()  # the folders it made are gone too


# --- demo --------------------------------------------------------------------------------------


def test_oracle_walk_through(capsys):
    before = np.get_printoptions()
    status, out, _ = run(capsys, "demo", "--oracle")
    assert status == 0
    assert np.get_printoptions() == before  # no global state left changed
    # Eq. 1 on a GAP head: the printed alpha^c equals the printed CAM weights w^c / Z (Z = 3 x 3).
    alpha = re.search(r"with Z = 9: \[([^\]]*)\]", out).group(1)
    cam_weights = re.search(r"w\^c / Z: +\[([^\]]*)\]", out).group(1)
    np.testing.assert_allclose(np.array(alpha.split(), dtype=float), np.array(cam_weights.split(), dtype=float))
    assert len(alpha.split()) == 3


@pytest.mark.slow
def test_demo_end_to_end(capsys, tmp_path):
    """The demo on the real network writes valid PNGs of the expected sizes and reports its maps."""
    out = tmp_path / "demo"
    status, printed, err = run(capsys, "demo", "--out", out)
    assert status == 0, err
    names = common.class_names()
    photos = {"chelsea": (300, 451), "coffee": (400, 600), "motorcycle": (500, 741), "astronaut": (512, 512)}
    expected = {f"{n}.png": viz.figure_size_px(4, s) for n, s in photos.items()}  # with guided Grad-CAM
    expected |= {n: viz.figure_size_px(3, (448, 448)) for n in ("collage.png", "collage-counterfactual.png")}
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, size in expected.items():
        with Image.open(out / name) as png:
            png.verify()
            assert (png.format, png.size) == ("PNG", size)
    # One top-5 line and one peak per photo; chelsea is a cat to the network.
    assert printed.count("  top-5: ") == 4 and printed.count(" peaks at x=") == 4
    chelsea_top = printed.split("chelsea (451 x 300)\n  top-5: ")[1].split(" | ")[0].rsplit(" ", 1)[0]
    assert names.index(chelsea_top) in range(281, 286)
    assert "what speaks against" in printed and "counterfactual" in printed
    gap = float(printed.split("max |alpha - w/Z| = ")[1].split(",")[0])
    assert gap < 1e-6  # alpha^c = w^c / Z on the GAP -> linear head, up to float32 rounding
    # JAX is installed in the test environment: the same weights in JAX give the same maps.
    jax_maps = float(printed.split("max |L_torch - L_jax| = ")[1].split(" ")[0])
    assert jax_maps < 1e-5  # float32 rounding; the maps go up to about 0.8
    # TensorFlow too (in its own interpreter: importing torchvision after it would crash this one).
    tf_maps = float(printed.split("max |L_torch - L_tf| = ")[1].split(" ")[0])
    assert tf_maps < 1e-5


# --- explain -----------------------------------------------------------------------------------


def test_explain_writes_a_figure_and_the_raw_map_per_image(capsys, setup):
    status, out, err = run(capsys, *setup["base"], "--out", setup["out"], "--batch-size", 2, *setup["images"])
    assert status == 0, err
    expected = expected_maps(setup["trained"], setup["images"])
    for i, path in enumerate(setup["images"]):
        raw = np.load(setup["out"] / f"{path.stem}.npy")
        assert raw.shape == (8, 8) and raw.dtype == np.float64
        # float32 convolutions round differently in batches of 2 + 1 than in one batch of 3
        np.testing.assert_allclose(raw, expected.maps[i], rtol=1e-5, atol=1e-5 * expected.maps[i].max())
        image = viz.load_image(path)
        with Image.open(setup["out"] / f"{path.stem}.png") as png:
            assert png.size == viz.figure_size_px(3, image.shape)
        label = ("red thing", "green thing", "blue thing")[int(expected.targets[i])]
        assert f"{path}: '{label}'" in out
    assert sorted(os.listdir(setup["out"])) == sorted(f"{p.stem}.{e}" for p in setup["images"] for e in ("png", "npy"))


def test_explain_guided_adds_the_guided_grad_cam_panel(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--guided", setup["images"][0])
    assert status == 0, err
    image = viz.load_image(setup["images"][0])
    with Image.open(setup["out"] / "a.png") as png:
        assert png.size == viz.figure_size_px(4, image.shape)
        panel = np.asarray(png.convert("RGB"))[viz.TITLE_PX:, 3 * viz.PANEL_PX:]
    assert panel.std() > 0  # the guided panel is a picture, not a flat fill
    want = expected_maps(setup["trained"], setup["images"][:1]).maps[0]  # float32 rounding of the inputs:
    np.testing.assert_allclose(np.load(setup["out"] / "a.npy"), want, rtol=1e-5, atol=1e-5 * want.max())


def test_explain_uses_the_weights_and_the_target_label(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--target", "Blue_Thing", setup["images"][0])
    assert status == 0, err
    raw = np.load(setup["out"] / "a.npy")
    want = expected_maps(setup["trained"], setup["images"][:1], 2).maps[0]
    np.testing.assert_allclose(raw, want, rtol=1e-5, atol=1e-5 * want.max())
    untrained = tiny_net().eval()  # a fresh random init: the map would differ without the weights
    assert not np.allclose(raw, expected_maps(untrained, setup["images"][:1], 2).maps[0])


def test_explain_from_a_file_factory_and_repeated_names(capsys, setup):
    factory = setup["tmp"] / "my_model.py"
    factory.write_text("from tests.cli.test_cli import tiny_net\n\ndef build():\n    return tiny_net()\n")
    copy = setup["tmp"] / "other" / "a.png"
    copy.parent.mkdir()
    copy.write_bytes(setup["images"][0].read_bytes())
    argv = [a if a != "tests.cli.test_cli:tiny_net" else f"{factory}:build" for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0], copy)
    assert status == 0, err
    assert sorted(os.listdir(setup["out"])) == ["a-2.npy", "a-2.png", "a.npy", "a.png"]
    np.testing.assert_array_equal(np.load(setup["out"] / "a.npy"), np.load(setup["out"] / "a-2.npy"))


def test_a_failure_mid_run_leaves_nothing_behind(capsys, setup, monkeypatch):
    setup["out"].mkdir()
    (setup["out"] / "keep.txt").write_text("from before")
    calls = []
    save = viz.save_figure

    def fail_on_second(fig, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save(fig, path)

    monkeypatch.setattr(viz, "save_figure", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        cli.main([str(a) for a in [*setup["base"], "--out", setup["out"], "--batch-size", 1, *setup["images"]]])
    assert os.listdir(setup["out"]) == ["keep.txt"]


# --- explain: each error case -------------------------------------------------------------------


def test_unreadable_image(capsys, setup):
    bad = setup["tmp"] / "bad.png"
    bad.write_text("not a png")
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], setup["images"][0], bad)
    assert_usage_error(status, err, "bad.png", "not an image")
    assert not setup["out"].exists()
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], setup["tmp"] / "missing.jpg")
    assert_usage_error(status, err, "missing.jpg", "no such file")


def test_unknown_layer_lists_candidates(capsys, setup):
    argv = [a if a != "conv" else "conv1" for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "'conv1' is not a submodule", "closest: ['conv']", "convolutions: ['conv']")
    assert not setup["out"].exists()


def test_missing_layer_for_a_factory_model(capsys, setup):
    argv = setup["base"][:setup["base"].index("--layer")] + setup["base"][setup["base"].index("--layer") + 2:]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "--layer is required", "['conv']")


def test_unknown_label(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--target", "purple thing", setup["images"][0])
    assert_usage_error(status, err, "unknown label 'purple thing'")
    assert not setup["out"].exists()


def test_target_index_out_of_range(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--target", 7, setup["images"][0])
    assert_usage_error(status, err, "target out of range", "C = 3")
    assert not setup["out"].exists()


def test_weights_that_do_not_fit(capsys, setup):
    other = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 5, 3), fc=nn.Linear(5, 3), extra=nn.Linear(1, 1)))
    path = setup["tmp"] / "other.pt"
    torch.save(other.state_dict(), path)
    argv = [a if a != setup["weights"] else path for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "do not fit", "unexpected keys ['extra.weight', 'extra.bias']",
                       "conv.weight (5, 3, 3, 3) vs (4, 3, 3, 3)")
    assert not setup["out"].exists()


def test_weights_with_arbitrary_objects_are_not_unpickled(capsys, setup):
    path = setup["tmp"] / "evil.pt"
    torch.save({"conv.weight": Arbitrary()}, path)
    argv = [a if a != setup["weights"] else path for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "weights_only=True", "arbitrary pickled objects are refused")
    torch.save(torch.zeros(3), path)  # a tensor, not a state dict
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "expected a state dict")
    status, _, err = run(capsys, *[a if a != setup["weights"] else setup["tmp"] / "none.pt" for a in setup["base"]],
                         "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "no such file")


@pytest.mark.parametrize(("model", "fragment"), [
    ("tests.no_such_module:tiny_net", "cannot import 'tests.no_such_module'"),
    ("tests.cli.test_cli:no_such_factory", "has no callable 'no_such_factory'"),
    ("tests.cli.test_cli:not_a_module", "must return a torch nn.Module, got str"),
    ("resnet-9000", "--model must be one of"),
])
def test_bad_model(capsys, setup, model, fragment):
    argv = [a if a != "tests.cli.test_cli:tiny_net" else model for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, fragment)


@pytest.mark.parametrize(("module", "extra"), [("tqdm", "viz"), ("torch", "torch")])
def test_missing_optional_dependency(capsys, setup, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "gradcam_ref.cli._torch", raising=False)
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, f"needs the optional dependency {module}", f"pip install 'gradcam-ref[{extra}]'")
    assert not setup["out"].exists()


def test_out_is_a_file(capsys, setup):
    setup["out"].write_text("a file")
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "not a directory")
    assert setup["out"].read_text() == "a file"


def test_bad_cmap(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--cmap", "nope", setup["images"][0])
    assert_usage_error(status, err, "--cmap", "'nope'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="platform: this machine has CUDA, so --device cuda is valid")
def test_cuda_asked_for_but_absent(capsys, setup):
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--device", "cuda", setup["images"][0])
    assert_usage_error(status, err, "CUDA is not available")


def test_the_named_model_default_layer(capsys, tmp_path):
    """explain with the built-in model: its split-form layer and preprocessing, on a shipped photo."""
    import skimage.data

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo, quality=95)
    status, out, err = run(capsys, "explain", photo, "--out", tmp_path / "out", "--target", "tabby")
    assert status == 0, err
    assert "'tabby' (281)" in out
    raw = np.load(tmp_path / "out" / "chelsea.npy")
    assert raw.shape == (zoo.IMAGE_SIZE // 32, zoo.IMAGE_SIZE // 32)
    assert Path(tmp_path / "out" / "chelsea.png").is_file()


# --- paths that were untested ------------------------------------------------------------------


class TwiceShared(nn.Module):
    """One ReLU module applied twice: its output is ambiguous without --call."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.relu(self.conv2(a))
        return self.fc(b.mean(dim=(2, 3)))


def twice_shared():
    torch.manual_seed(5)
    return TwiceShared()


def test_explain_call_picks_a_call_of_a_shared_layer(capsys, setup):
    base = ["explain", "--model", "tests.cli.test_cli:twice_shared", "--layer", "relu", "--size", SIZE,
            "--labels", setup["base"][-1]]
    model = twice_shared().eval()
    for call, side in ((0, 16), (-1, 8), (1, 8)):
        out = setup["tmp"] / f"out{call}"
        status, _, err = run(capsys, *base, "--call", call, "--out", out, setup["images"][0])
        assert status == 0, err
        raw = np.load(out / "a.npy")
        assert raw.shape == (side, side)
        np.testing.assert_allclose(raw, expected_maps(model, setup["images"][:1], layer="relu", call=call).maps[0],
                                   rtol=1e-5, atol=1e-5 * float(np.max(raw)))
    status, _, err = run(capsys, *base, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "ran 2 times in one forward pass", "pass call=i")
    status, _, err = run(capsys, *base, "--call", 2, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "call=2 but layer 'relu' ran 2 time(s)")
    assert not setup["out"].exists()


def test_explain_mean_and_std_are_used_and_checked(capsys, setup):
    mean, std = (0.5, 0.25, 0.0), (0.5, 2.0, 1.0)
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], "--mean", "0.5,0.25,0", "--std", "0.5,2,1",
                         setup["images"][0])
    assert status == 0, err
    want = expected_maps(setup["trained"], setup["images"][:1], mean=mean, std=std).maps[0]
    np.testing.assert_allclose(np.load(setup["out"] / "a.npy"), want, rtol=1e-5, atol=1e-5 * want.max())
    assert not np.allclose(want, expected_maps(setup["trained"], setup["images"][:1]).maps[0])
    smallest = "std >= 1.18e-38, float32's smallest normal number"
    for option, value, fragment in (("--std", "0,1,1", f"--std must be 1 or 3 comma-separated finite numbers ({smallest})"),
                                    ("--std", "1,-1,1", smallest),
                                    ("--mean", "0.1,0.2", "--mean must be 1 or 3 comma-separated finite numbers"),
                                    # these ran, and failed with "activations contains NaN or Inf"
                                    ("--std", "nan,1,1", smallest), ("--std", "inf", smallest),
                                    ("--std", "1e-320,1,1", smallest), ("--mean", "inf,0,0", "finite numbers"),
                                    ("--mean", "nan", "finite numbers"), ("--mean", "1e+39", "finite numbers")):
        status, _, err = run(capsys, *setup["base"], "--out", setup["tmp"] / "bad", option, value, setup["images"][0])
        assert_usage_error(status, err, fragment, f"got {value}")
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in [*setup["base"], "--mean", "a,b,c", setup["images"][0]]])
    assert exit_.value.code == 2 and "expected comma-separated numbers, got 'a,b,c'" in capsys.readouterr().err
    assert not (setup["tmp"] / "bad").exists()


def test_explain_refuses_overflowing_standardisation(capsys, setup):
    """(x - mean) / std of pixels x in [0, 1] beyond float32's range was "activations contains NaN or Inf"."""
    status, _, err = run(capsys, *setup["base"], "--out", setup["tmp"] / "bad", "--mean", "1e38", "--std", "0.01",
                         setup["images"][0])
    assert_usage_error(status, err, "--mean 1e+38 and --std 0.01 standardise pixels in [0, 1] to up to 1e+40",
                       "float32's largest number 3.4e+38")
    assert not (setup["tmp"] / "bad").exists()


@pytest.mark.parametrize(("argv", "fragment"), [
    # --size 100000 allocated until the process was killed (no message); refused while parsing, before any work
    (["explain", "x.png", "--size", "100000"], "argument --size: expected N or HxW with positive ints, "
     "at most 67108864 pixels (8192 x 8192), got '100000'"),
    (["explain", "x.png", "--size", "9000x8000"], "at most 67108864 pixels"),
    (["evaluate", "--demo", "--size", "100000"], "argument --size"),
    (["evaluate", "--demo", "--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),  # NumPy's message
    (["demo", "--oracle", "--seed", "-1"], "argument --seed: expected an int >= 0"),
    (["gain", "--seed", "1.5"], "argument --seed: expected an int >= 0, got '1.5'"),
])
def test_absurd_sizes_and_negative_seeds_are_refused_while_parsing(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and fragment in err, err


def test_size_takes_the_largest_allowed_input():
    assert options.size("8192") == (8192, 8192) and options.size("16384x4096") == (16384, 4096)


def test_demo_oracle_seed(capsys):
    outputs = {}
    for seed in (3, 4, 3):
        status, out, _ = run(capsys, "demo", "--oracle", "--seed", seed)
        assert status == 0
        alpha = re.search(r"with Z = 9: \[([^\]]*)\]", out).group(1)
        cam_weights = re.search(r"w\^c / Z: +\[([^\]]*)\]", out).group(1)
        np.testing.assert_allclose(np.array(alpha.split(), dtype=float), np.array(cam_weights.split(), dtype=float))
        outputs.setdefault(seed, []).append(out)
    assert outputs[3][0] == outputs[3][1]  # a seed gives the same walk-through every time
    assert outputs[3][0] != outputs[4][0]  # and another seed another network


@pytest.mark.slow
def test_verify_through_main_with_the_shipped_goldens(capsys):
    import json

    from gradcam_ref.verify import goldens

    assert cli.main(["verify", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(row["passed"] for row in rows)
    checked = {row["check"] for row in rows}
    for name in goldens.names():  # every shipped golden, EfficientNet-Lite0's included
        assert any(check.startswith(f"golden {name} ") for check in checked), name


# --- errors raised by the user's code: one line, exit status 2 ----------------------------------


def test_a_factory_that_raises(capsys, setup):
    factory = setup["tmp"] / "raising.py"
    factory.write_text("def build():\n    raise RuntimeError('no GPU\\nfound')\n")
    argv = [a if a != "tests.cli.test_cli:tiny_net" else f"{factory}:build" for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "build() raised RuntimeError: no GPU found")


def test_a_model_file_with_a_syntax_error(capsys, setup):
    factory = setup["tmp"] / "broken.py"
    factory.write_text("def build(:\n    pass\n")
    argv = [a if a != "tests.cli.test_cli:tiny_net" else f"{factory}:build" for a in setup["base"]]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, f"importing '{factory}' failed: SyntaxError")


class KeyErrorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return {"a": self.conv(x)}["logits"]


def test_a_model_raising_mid_run(capsys, setup):
    argv = ["explain", "--model", "tests.cli.test_cli:KeyErrorNet", "--layer", "conv", "--size", SIZE]
    status, _, err = run(capsys, *argv, "--out", setup["out"], setup["images"][0])
    assert_usage_error(status, err, "the model failed on inputs of shape (1, 3, 32, 32): KeyError: 'logits'")
    assert not setup["out"].exists()


def test_out_below_a_file_names_the_file(capsys, setup):
    blocker = setup["tmp"] / "file"
    blocker.write_text("x")
    status, _, err = run(capsys, *setup["base"], "--out", blocker / "sub", setup["images"][0])
    assert_usage_error(status, err, f"--out {blocker / 'sub'}: {blocker} is a file, not a directory")


def test_ctrl_c_is_one_line_and_leaves_nothing(capsys, setup, monkeypatch):
    def interrupt(fig, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(viz, "save_figure", interrupt)
    status, _, err = run(capsys, *setup["base"], "--out", setup["out"], setup["images"][0])
    assert status == 130 and err == "gradcam-ref explain: interrupted, nothing written\n"
    assert not setup["out"].exists()


SLOW_MODEL = '''
import os, pathlib, time
from tests.cli.test_cli import tiny_net

class Slow(type(tiny_net())):
    calls = 0
    def forward(self, x):
        Slow.calls += 1
        if Slow.calls == 2:  # the first batch's files are in the staging folder by now
            pathlib.Path(os.environ["MARKER"]).write_text("running")
            time.sleep(60)
        return super().forward(x)

def build():
    model = tiny_net()
    model.__class__ = Slow
    return model
'''


def test_sigterm_mid_run_cleans_up_like_ctrl_c(setup):
    """SIGTERM (what `kill`, systemd and job schedulers send) unwinds and removes the staging folder."""
    import signal
    import subprocess
    import time

    factory = setup["tmp"] / "slow.py"
    factory.write_text(SLOW_MODEL)
    marker = setup["tmp"] / "marker"
    argv = [a if a != "tests.cli.test_cli:tiny_net" else f"{factory}:build" for a in setup["base"]]
    argv = [str(a) for a in [*argv, "--out", setup["out"], "--batch-size", 1, *setup["images"]]]
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gradcam_ref.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        cwd=root, env={**os.environ, "MARKER": str(marker), "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached its second batch"
            time.sleep(0.05)
        staged = [p for p in setup["out"].iterdir() if p.name.startswith(".gradcam-ref-")]
        assert len(staged) == 1 and {p.suffix for p in staged[0].iterdir()} == {".png", ".npy"}  # half-written
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not setup["out"].exists()  # the folder it created, staging included, is gone


@pytest.mark.parametrize("command", [("evaluate", "--demo"), ("explain-dataset", "images"), ("explain", "a.png")])
def test_every_model_command_checks_mean_and_std_before_loading_the_model(capsys, tmp_path, command):
    """--size/--mean/--std are declared once for the commands that load a torch model, and checked once."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = [command[0], str(image) if command[1] == "a.png" else str(tmp_path), "--model", "no_such_module:factory",
            "--std", "0,1,1", "--out", str(tmp_path / "out")]
    if command[0] == "evaluate":
        argv[1:2] = ["--demo"]
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"gradcam-ref {command[0]}: error: --std must be 1 or 3 comma-separated finite numbers")
    assert not (tmp_path / "out").exists()
