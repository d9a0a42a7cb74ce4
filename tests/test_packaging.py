"""The wheel holds the whole package: every tracked file under ``gradcam_ref/`` and ``backends/``
(the latter installed as ``gradcam_ref.backends``), code and data alike.

The tests, the type check and ``make`` run on the source tree or an editable install, which see
every file whatever ``pyproject.toml`` lists; only a built wheel shows what a user's
``pip install`` gets (the TensorFlow backend and the goldens were once left out of it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_name(tracked: str) -> str:
    """Where a tracked file lands in the wheel: ``backends/x`` becomes ``gradcam_ref/backends/x``."""
    return f"gradcam_ref/{tracked}" if tracked.startswith("backends/") else tracked


def test_the_wheel_holds_every_tracked_file_of_the_package(tmp_path):
    """Built from a copy of the tracked files alone: setuptools would reuse a ``build/lib`` left in
    the checkout, files of earlier builds included."""
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "gradcam_ref", "backends"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(wheels), str(source)], check=True, capture_output=True)
    expected = {installed_name(name) for name in tracked if name.startswith(("gradcam_ref/", "backends/"))}
    (wheel,) = wheels.glob("gradcam_ref-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert len(expected) > 50 and "gradcam_ref/backends/tensorflow/__init__.py" in expected
    assert sorted(expected - shipped) == [], "tracked but not in the wheel"
    assert sorted(shipped - expected) == [], "in the wheel but not tracked"
