"""Every output option of the command line is checked before any work, by one helper.

An output that cannot be made ends with exit status 2 and one line naming the option, the path and
why, before a model is loaded or trained; nothing is created. (Before: ``explain-dataset --out
afile/sub.zarr --resume`` said the store existed, ``explain-dataset --out /proc/x.zarr`` ended in a
traceback, ``evaluate --json afile/out.json`` in a traceback after every metric had run.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_ref import cli
from gradcam_ref._files import write_json
from gradcam_ref.cli import _common as common
from gradcam_ref.cli import dataset as dataset_command
from gradcam_ref.cli import demo as demo_command

NO_MODEL = "no_such_module_for_gradcam_ref_tests:factory"  # loading it would be the error: it must not come


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def never(*args, **kwargs):
    raise AssertionError("the work started before the output path was checked")


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A folder with an image, a file ``afile`` and a box file; the commands that load no model by
    ``--model`` fail loudly if their work starts."""
    from gradcam_ref.experiments import comparison, gain_experiment

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "afile").write_text("hi")
    (tmp_path / "boxes.json").write_text('{"a.png": [0, 0, 4, 4]}')
    monkeypatch.setattr(demo_command, "import_torch_cli", never)
    monkeypatch.setattr(gain_experiment, "run", never)
    monkeypatch.setattr(comparison, "lesion_comparison", never)
    return tmp_path


# (command, option, argv before the option, does the option name a folder)
COMMANDS = [
    ("explain", "--out", ["explain", "{tmp}/a.png", "--model", NO_MODEL], True),
    ("explain-dataset", "--out", ["explain-dataset", "{tmp}", "--model", NO_MODEL], True),
    ("explain-dataset", "--out", ["explain-dataset", "{tmp}", "--model", NO_MODEL, "--resume"], True),
    ("evaluate", "--json", ["evaluate", "{tmp}/a.png", "--boxes", "{tmp}/boxes.json", "--model", NO_MODEL], False),
    ("evaluate", "--out", ["evaluate", "--lesions"], True),
    ("demo", "--out", ["demo"], True),
    ("gain", "--out", ["gain"], True),
]

# (path under tmp, why), "{tmp}" for the folder
PATHS = [
    ("afile/sub", "{tmp}/afile is a file, not a directory"),
    ("afile/deeper/sub", "{tmp}/afile is a file, not a directory"),
    ("/proc/gradcam-ref-test", "cannot create it (No such file or directory)"),
    ("x" * 300 + "/out", "cannot create it (File name too long)"),
]


@pytest.mark.parametrize(("command", "option", "argv", "folder"), COMMANDS)
@pytest.mark.parametrize(("path", "why"), PATHS)
def test_an_output_that_cannot_be_made_is_one_line_before_any_work(capsys, place, command, option, argv, folder,
                                                                    path, why):
    out = Path(path) if path.startswith("/") else place / path
    before = sorted(os.listdir(place))
    argv = [a.format(tmp=place) for a in argv]
    status, printed, err = run(capsys, *argv, option, out)
    assert (status, printed) == (2, "")
    assert err == f"gradcam-ref {command}: error: {option} {out}: {why.format(tmp=place)}\n"
    assert sorted(os.listdir(place)) == before and (place / "afile").read_text() == "hi"


@pytest.mark.parametrize(("command", "option", "argv", "folder"), COMMANDS)
def test_a_file_where_a_folder_is_wanted_and_a_folder_where_a_file_is(capsys, place, command, option, argv, folder):
    argv = [a.format(tmp=place) for a in argv]
    out, why = (place / "afile", "exists and is not a directory") if folder else (place, "is a directory, not a file")
    status, _, err = run(capsys, *argv, option, out)
    assert (status, err) == (2, f"gradcam-ref {command}: error: {option} {out}: {why}\n")
    assert (place / "afile").read_text() == "hi"


def test_an_existing_store_without_resume_is_refused_before_the_model_loads(capsys, place):
    (place / "maps.zarr").mkdir()
    status, _, err = run(capsys, "explain-dataset", place, "--model", NO_MODEL, "--out", place / "maps.zarr")
    assert (status, err) == (2, f"gradcam-ref explain-dataset: error: --out {place / 'maps.zarr'}: exists; add "
                                "--resume to continue it, or choose another --out\n")


def test_explain_dataset_names_a_creation_failure_as_such_not_as_an_existing_store(capsys, tmp_path, monkeypatch):
    """Were the path to become impossible after the check (another process), the FileExistsError of
    creating its parent is not the store's: it was read as 'exists; add --resume'."""
    from tests.dataset.helpers import SIZE, make_images

    make_images(tmp_path / "images", 2)
    (tmp_path / "afile").write_text("hi")
    monkeypatch.setattr(dataset_command, "check_output", lambda option, value, folder: Path(value))
    out = tmp_path / "afile" / "sub.zarr"
    status, _, err = run(capsys, "explain-dataset", tmp_path / "images", "--model", "tests.dataset.helpers:tiny_model",
                         "--layer", "2", "--size", SIZE, "--num-workers", "0", "--quiet", "--out", out, "--resume")
    assert (status, err) == (2, f"gradcam-ref explain-dataset: error: --out {out}: cannot create it (File exists)\n")


def test_check_output_accepts_what_can_be_made_and_leaves_nothing(tmp_path):
    (tmp_path / "kept").mkdir()
    for value, folder in [(tmp_path / "new" / "deeper", True), (tmp_path / "kept", True),
                          (tmp_path / "kept" / "x.json", False), (tmp_path / "new" / "x.json", False),
                          (tmp_path / ("y" * 255), False)]:
        assert common.check_output("--out", str(value), folder=folder) == value
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_the_json_is_written_atomically_whatever_its_name(tmp_path):
    """The temporary file beside it has a short name of its own (it was ``.{name}.XXXXXXXX.tmp``: a
    name the file system allows left no room for it), and it is removed if writing fails."""
    long = tmp_path / ("r" * 250 + ".json")
    write_json(long, {"a": [1, 2]})
    assert json.loads(long.read_text()) == {"a": [1, 2]}
    mask = os.umask(0)
    os.umask(mask)
    assert (long.stat().st_mode & 0o777) == 0o666 & ~mask  # not the temporary file's private 0600
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(long, {"a": object()})
    assert json.loads(long.read_text()) == {"a": [1, 2]}  # the old file, whole
    assert os.listdir(tmp_path) == [long.name]  # and no temporary file left
