"""``gradcam-ref verify``: the JSON it promises, failure when a reference is perturbed, ``--explain``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pytest

from gradcam_ref import conventions as _conventions
from gradcam_ref import verify
from gradcam_ref.cli import main
from gradcam_ref.conventions import CONVENTIONS, Relu, describe
from gradcam_ref.verify import goldens, tf_peers

KEYS = {"check", "reference", "max_abs_diff", "tolerance", "passed"}
ORACLE = [n for n in goldens.names() if goldens.load(n).model == "oracle"]


@pytest.fixture(scope="module")
def oracle_goldens(tmp_path_factory):
    """The shipped oracle goldens, copied (EfficientNet's are checked once, in the slow test)."""
    directory = tmp_path_factory.mktemp("goldens")
    for name in ORACLE:
        shutil.copy(goldens.DIRECTORY / f"{name}.npz", directory)
    return directory


@pytest.fixture
def tensorflow_in_process(monkeypatch):
    """verify's TensorFlow half run in this process (torchvision came first: tests/conftest.py),
    goldens only: the real subprocess and the TF peers run once, in the ``report`` fixture."""
    monkeypatch.setattr(tf_peers, "run_isolated", lambda directory=None, timeout=0, perturbation="all": tf_peers.golden_checks(directory))


def run_json(capsys, *args):
    rc = main(["verify", "--json", *args])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


@pytest.fixture(scope="module")
def report(oracle_goldens):
    """``gradcam-ref verify --json`` on the oracle goldens: (exit status, rows, notes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # Score-CAM and Ablation-CAM on resnet18 run in tests/backends/test_methods_backends.py (slow)
        rc = main(["verify", "--json", "--goldens", str(oracle_goldens), "--perturbation", "small"])
    return rc, json.loads(out.getvalue()), err.getvalue()


def test_json_is_a_list_of_checks_with_the_promised_keys(report):
    rc, rows, _ = report
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == KEYS
        assert isinstance(row["check"], str) and isinstance(row["reference"], str)
        assert isinstance(row["max_abs_diff"], float) and isinstance(row["tolerance"], float)
        assert isinstance(row["passed"], bool)
        assert row["passed"] == (row["max_abs_diff"] <= row["tolerance"])
    assert rc == 0 and all(row["passed"] for row in rows)


def test_every_golden_runs_on_every_installed_backend_and_every_peer_on_several_models(report):
    _, rows, notes = report
    checks = {row["check"] for row in rows}
    assert {"numpy", "torch", "jax"} <= set(verify.installed_backends())
    for name in ORACLE:
        for backend in ("numpy", "torch", "jax"):
            for key in verify.COMPARED:
                assert f"golden {name} [{backend}] {key}" in checks
        for key in verify.COMPARED:
            assert f"golden {name} torch vs jax {key}" in checks
        assert f"golden {name} heatmap paper" in checks
    for convention in ("captum", "pytorch-grad-cam", "torchcam"):
        on = [c for c in checks if c.startswith(f"{convention} on ")]
        assert len(on) == 3, convention  # two small CNNs and resnet18
    # the TensorFlow half, from its own interpreter: goldens, torch vs tensorflow, the TF peers themselves
    for name in ORACLE:
        for key in verify.COMPARED:
            assert f"golden {name} [tensorflow] {key}" in checks
            assert f"golden {name} torch vs tensorflow {key}" in checks
    tkv = [c for c in checks if c.startswith("tf-keras-vis on ")]
    assert len(tkv) == 5  # the oracle in float64 and float32, a BN/pool CNN, MobileNetV2 at two layers
    assert "tf-keras-vis on random_gap_2d (float64), layer 'relu1' -> 'conv1'" in checks  # its find_layer
    assert len([c for c in checks if c.startswith("xplique on ")]) == 4  # float32 only: noted
    assert len([c for c in checks if c.startswith("xplique GradCAMPP on ")]) == 4
    assert "xplique casts inputs and targets to float32" in notes
    # the rest of their CAM family; --perturbation small: Scorecam at layers of <= 64 channels
    counts = {"tf-keras-vis layercam": 5, "tf-keras-vis grad-cam++": 5, "tf-keras-vis score-cam": 3,
              "tf-keras-vis score-cam (max_n=2)": 3, "xplique fem": 4}
    for prefix, count in counts.items():
        assert len([c for c in checks if c.startswith(f"{prefix} on ")]) == count, prefix
    assert "Scorecam on float64 models: not run" in notes and "FEM on float64 models: not run" in notes
    assert "torch vs JAX" not in notes
    for peer in verify.METHOD_PEERS:  # each CAM method of each peer: both small CNNs (+ resnet18)
        on = [c for c in checks if c.startswith(f"{peer.convention} {peer.method} on ")]
        assert len(on) == (2 if peer.perturbation else 3), (peer.convention, peer.method)


def test_a_perturbed_golden_fails_exactly_its_checks(tmp_path, oracle_goldens, capsys, goldens_only):
    for path in oracle_goldens.iterdir():
        shutil.copy(path, tmp_path)
    with np.load(tmp_path / "random_gap_2d.npz") as data:
        arrays = dict(data)
    arrays["maps"] = arrays["maps"].copy()
    arrays["maps"].flat[arrays["maps"].argmax()] *= 1 + 1e-9  # invisible in a plot, 1000x the golden's rtol
    arrays["heatmap.captum"] = arrays["heatmap.captum"] + 1e-9
    np.savez_compressed(tmp_path / "random_gap_2d.npz", **arrays)

    rc, rows, _ = run_json(capsys, "--goldens", str(tmp_path))
    failed = {row["check"] for row in rows if not row["passed"]}
    assert rc == 1
    assert failed == {"golden random_gap_2d [numpy] maps", "golden random_gap_2d [torch] maps",
                      "golden random_gap_2d [jax] maps", "golden random_gap_2d [tensorflow] maps",
                      "golden random_gap_2d heatmap captum"}


def test_a_convention_that_no_longer_matches_its_peer_fails(monkeypatch):
    # captum with the paper's ReLU: its maps lose their negative values, the peer's do not
    changed = dataclasses.replace(CONVENTIONS["captum"], steps=(Relu(), *CONVENTIONS["captum"].steps))
    monkeypatch.setitem(CONVENTIONS, "captum", changed)
    checks, _ = verify.peer_checks(verify.peer_cases()[:2])
    failed = {c.check for c in checks if not c.passed}
    assert failed == {c.check for c in checks if c.check.startswith("captum on ")} and len(failed) == 2


@pytest.fixture
def goldens_only(monkeypatch, tensorflow_in_process):
    """verify's golden checks alone: the peers' checks run in the ``report`` fixture and in
    tests/cli/test_cli.py's full run (each full run of them costs minutes here)."""
    monkeypatch.setattr(verify, "peer_checks", lambda: ([], []))
    monkeypatch.setattr(verify, "method_peer_checks", lambda perturbation="all": ([], []))


def test_table_output_and_exit_status(oracle_goldens, capsys, monkeypatch, goldens_only):
    assert main(["verify", "--goldens", str(oracle_goldens)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["check", "reference", "max_abs_diff", "tolerance", "result"]
    assert out[-1] == f"{len(out) - 2} of {len(out) - 2} checks passed"
    good, bad = verify.Check("good", "ref", 0.5, 1.0), verify.Check("bad", "ref", 2.0, 1.0)
    monkeypatch.setattr(verify, "golden_checks", lambda directory=None: ([good], []))
    monkeypatch.setattr(verify, "peer_checks", lambda: ([bad], []))
    monkeypatch.setattr(tf_peers, "run_isolated", lambda directory=None, timeout=0, perturbation="all": ([], []))
    assert main(["verify", "--goldens", str(oracle_goldens)]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[1:] == [["good", "ref", "0.5", "1", "pass"], ["bad", "ref", "2", "1", "FAIL"],
                        "1 of 2 checks passed, 1 FAILED".split()]


def test_no_finite_difference_is_null_and_fails():
    for diff in (math.nan, math.inf):
        check = verify.compare("c", "r", [diff], [1.0], 1e-5)
        assert not check.passed and check.as_dict()["max_abs_diff"] is None
    assert not verify.compare("c", "r", [1.0, 2.0], [1.0], 1e-5).passed  # shape mismatch
    assert verify.compare("c", "r", [0.0], [0.0], 1e-5).tolerance == 1e-5  # all-zero reference


@pytest.mark.slow
def test_efficientnet_goldens_run_on_torch_and_jax_and_are_noted_for_numpy(tmp_path):
    """(The tensorflow backend's EfficientNet rows: tests/backends/test_tensorflow_backend.py.)"""
    cases = ("efficientnet_lite0_block15", "efficientnet_lite0_head")  # split after block 15 / at the head
    for name in cases:
        shutil.copy(goldens.DIRECTORY / f"{name}.npz", tmp_path)
    checks, notes = verify.golden_checks(tmp_path)
    names = {c.check for c in checks}
    for name in cases:
        for backend in ("[torch]", "[jax]", "torch vs jax"):
            assert {f"golden {name} {backend} {key}" for key in verify.COMPARED} <= names
    assert not any("[numpy]" in name for name in names)
    assert all(c.passed for c in checks)
    assert notes == [f"golden {name}: the numpy backend cannot run a 'efficientnet-lite0' model" for name in cases]


def test_torch_vs_jax_rows_fail_when_one_framework_drifts(monkeypatch, oracle_goldens):
    """The direct torch-vs-JAX rows see a difference the size of 1e-9 of the map's maximum."""
    original = verify.GOLDEN_RUNNERS["jax"]

    def drifted(golden):
        e = original(golden)
        maps = e.maps.copy()
        maps.flat[maps.argmax()] *= 1 + 1e-9
        return dataclasses.replace(e, maps=maps)

    monkeypatch.setitem(verify.GOLDEN_RUNNERS, "jax", drifted)
    checks, _ = verify.golden_checks(oracle_goldens)
    failed = {c.check for c in checks if not c.passed}
    assert {f"golden {name} torch vs jax maps" for name in ORACLE} <= failed
    assert all(c.passed for c in checks if "torch vs jax" in c.check and not c.check.endswith("maps"))


# --- --explain --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_explain_prints_the_conventions_record(name, capsys):
    assert main(["verify", "--explain", name]) == 0
    out = capsys.readouterr().out
    assert out == describe(name) + "\n"
    assert CONVENTIONS[name].library in out


def test_explain_lists_each_method_deviation_of_the_tensorflow_peers(capsys):
    assert main(["verify", "--explain", "tf-keras-vis"]) == 0
    out = capsys.readouterr().out
    for method in ("grad-cam++", "layercam", "score-cam"):
        assert f"\n  {method}:\n    - " in out, method
    assert "keeps the factor exp(score)" in out and "divides each channel's alphas by their spatial sum" in out
    assert "max_N (Faster-ScoreCAM)" in out and "methods it implements: grad-cam, grad-cam++, layercam, score-cam" in out
    assert main(["verify", "--explain", "xplique"]) == 0
    out = capsys.readouterr().out
    assert "\n  fem:\n    its steps: resize to the requested size: bicubic" in out and "without a final ReLU" in out


def test_explain_reads_the_same_records_the_heatmaps_use(capsys, monkeypatch):
    changed = dataclasses.replace(CONVENTIONS["torchcam"], differences=((5, "a rewritten reason"),))
    monkeypatch.setitem(CONVENTIONS, "torchcam", changed)
    main(["verify", "--explain", "torchcam"])
    assert "a rewritten reason [reason 5: normalisation" in capsys.readouterr().out
    assert _conventions.get_convention("torchcam") is changed  # what postprocess runs


def test_explain_accepts_aliases_and_refuses_unknown_libraries(capsys):
    assert main(["verify", "--explain", "grad-cam"]) == 0
    assert capsys.readouterr().out.startswith("pytorch-grad-cam: pytorch-grad-cam 1.5.7")
    assert main(["verify", "--explain", "tf-explain"]) == 2
    assert "convention must be one of ['captum', 'paper'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", "--json", "--explain", "captum"])  # one output at a time


def test_a_directory_without_goldens_is_an_error_not_a_pass(tmp_path, capsys):
    assert main(["verify", "--goldens", str(tmp_path / "missing")]) == 2
    assert "no directory of goldens at" in capsys.readouterr().err
    assert main(["verify", "--goldens", str(tmp_path)]) == 2
    assert f"no golden (*.npz) in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert main(["verify", "--goldens", str(tmp_path)]) == 2
    assert "broken.npz is not an .npz of plain numeric and string arrays" in capsys.readouterr().err
