"""The examples in the docstrings of backends/, run on the modules as installed (``gradcam_ref.backends.*``).

pytest's ``--doctest-modules`` would import each file of backends/ a second time under another name
(``backends.numpy_backend`` beside ``gradcam_ref.backends.numpy_backend``), and every backend's
framework while it looks for examples; so backends/ is not in pytest's testpaths and its examples
run here, by DocTestRunner, with pytest's option flags (ELLIPSIS).
"""

from __future__ import annotations

import doctest
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted((ROOT / "backends").rglob("*.py")):
        if ">>> " in path.read_text():
            parts = [p for p in path.relative_to(ROOT / "backends").with_suffix("").parts if p != "__init__"]
            names.append(".".join(["gradcam_ref.backends", *parts]))
    return names


MODULES = _modules_with_examples()


def test_the_oracle_is_among_the_modules_with_examples():
    assert "gradcam_ref.backends.numpy_backend" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_examples_in_docstrings(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name}: no example ran"
    assert results.failed == 0, "".join(report)
    assert f"backends.{name.removeprefix('gradcam_ref.backends.')}" not in sys.modules  # no second copy
