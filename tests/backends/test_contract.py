"""The house's rules, checked: backends implement the Protocol, import the core only through the
contract, and nothing imports in a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import backends
from gradcam_ref.backends import _contract
from gradcam_ref.backends._contract import Backend, arguments_of, check_where, perturb_chunks, same_parameters

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"gradcam_ref": ROOT / "gradcam_ref", "gradcam_ref.backends": ROOT / "backends"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (backends/ is gradcam_ref.backends)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            if package == "gradcam_ref" and relative.parts[0] == "backends":
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _top_level_imports(name: str, path: Path) -> set[str]:
    """The gradcam_ref modules that ``name`` imports at import time (not inside functions)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            imported.add(module)
            imported |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in imported if m.startswith("gradcam_ref")}


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_every_backend_implements_the_protocol(name):
    backend = backends.load(name)
    assert isinstance(backend, Backend)
    assert backend.NAME == name
    assert isinstance(backend.GUIDED, bool) and isinstance(backend.DIFFERENTIABLE, bool)


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_explain_takes_exactly_the_parameters_of_capture(name):
    """The signature is written once, on capture; help(), IDEs and type checkers see it on explain."""
    import inspect

    backend = backends.load(name)
    capture, explain = inspect.signature(backend.capture), inspect.signature(backend.explain)
    assert list(explain.parameters.values()) == list(capture.parameters.values())
    assert explain.return_annotation in ("Explanation", gradcam_ref.Explanation)
    assert capture.return_annotation in ("Capture", gradcam_ref.Capture)


def test_backends_use_the_core_only_through_the_contract():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("gradcam_ref.backends") or name == "gradcam_ref.backends._contract":
            continue
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradcam_ref"):
                imports.add(node.module)
                if node.module == "gradcam_ref.backends._contract":  # the contract lists what it offers
                    unlisted = {a.name for a in node.names} - set(_contract.__all__)
                    assert not unlisted, f"{name} imports {sorted(unlisted)}, not in backends._contract.__all__"
            elif isinstance(node, ast.Import):
                imports |= {a.name for a in node.names if a.name.startswith("gradcam_ref")}
        private = {m for m in imports if not m.startswith("gradcam_ref.backends") and m != "gradcam_ref"}
        assert not private, f"{name} imports {sorted(private)}: core functions come from backends._contract"
        assert not any(m.startswith("gradcam_ref.cli") for m in imports)


def test_module_docstrings_state_the_design_briefly():
    """Every module says what it holds in at most 25 lines; long explanations live in docs/."""
    long = {}
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        assert doc, f"{name} has no module docstring"
        if len(doc.splitlines()) > 25:
            long[name] = len(doc.splitlines())
    assert not long, f"module docstrings over 25 lines: {long}"


def test_no_import_loops_between_modules():
    modules = _modules()
    graph = {name: {m for m in _top_level_imports(name, path) if m in modules} - {name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how a package is assembled; a
    # submodule importing its package back at import time would be a loop and is kept.
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            raise AssertionError(f"import loop: {' -> '.join(cycle)}")
        if node in done:
            return
        for child in graph[node]:
            if node.startswith(child + ".") and child in stack:  # submodule -> its own package
                continue
            visit(child, [*stack, node])
        done.add(node)

    for name in graph:
        visit(name, [])


def test_every_module_imports_alone():
    """Each module imported first, in a fresh interpreter state for gradcam_ref (frameworks cached)."""
    names = [n for n in _modules() if not n.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('gradcam_ref')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_warnings_and_conventions_are_public():
    from gradcam_ref import _warnings

    reference = (Path(__file__).parents[2] / "docs" / "reference.md").read_text()
    classes = [name for name in _warnings.__all__ if name.endswith("Warning")]
    assert len(classes) >= 6
    for name in classes:  # every warning class: importable from gradcam_ref, in the API reference
        assert issubclass(getattr(gradcam_ref, name), UserWarning) and name in gradcam_ref.__all__
        assert f"::: gradcam_ref.{name}\n" in reference, name
    assert {"paper", "pytorch-grad-cam", "captum", "torchcam", "tf-keras-vis"} <= set(gradcam_ref.conventions.CONVENTIONS)
    assert callable(gradcam_ref.conventions.postprocess) and callable(gradcam_ref.conventions.describe)


def test_perturb_chunks_cover_each_examples_copies_in_batches():
    a = np.zeros((3, 5, 1, 1))
    counts = {0: 5, 1: 2, 2: 0}
    got = list(perturb_chunks(a, 2, lambda a, n: counts[n]))
    assert got == [(0, 5, [(0, 2), (2, 4), (4, 5)]), (1, 2, [(0, 2)]), (2, 0, [])]
    assert list(perturb_chunks(a, 8)) == [(i, 5, [(0, 5)]) for i in range(3)]
    assert list(perturb_chunks(a, 2, lambda a, n: np.int64(1))) == [(i, 1, [(0, 1)]) for i in range(3)]
    with pytest.raises(ValueError, match=r"count\(A, 0\) must be an int in \[0, 5\] \(A's channels\), got 6"):
        list(perturb_chunks(a, 2, lambda a, n: 6))
    with pytest.raises(ValueError, match=r"count\(A, 0\) must be an int in \[0, 5\] \(A's channels\), got 2.0"):
        list(perturb_chunks(a, 2, lambda a, n: 2.0))
    with pytest.raises(ValueError, match="where must be 'activations' or 'inputs', got 'outputs'"):
        check_where("outputs")
    check_where("inputs")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 40), batch_size=st.integers(1, 50), data=st.data())
def test_perturb_chunks_partition_range_of_copies(n, k, batch_size, data):
    counts = data.draw(st.lists(st.integers(0, k), min_size=n, max_size=n))
    got = list(perturb_chunks(np.zeros((n, k, 2)), batch_size, lambda a, i: counts[i]))
    assert [i for i, _, _ in got] == list(range(n))
    for (_, copies, spans), count in zip(got, counts, strict=True):
        assert copies == count
        covered = [j for start, stop in spans for j in range(start, stop)]
        assert covered == list(range(count))  # in order, each copy once
        assert all(0 < stop - start <= batch_size for start, stop in spans)
        assert all(stop - start == batch_size for start, stop in spans[:-1])


def test_arguments_of_binds_a_call_to_captures_parameters_by_name():
    """What the JAX and TensorFlow explains hand their program: capture's arguments by name, its
    defaults applied; a call capture would refuse is refused with capture's TypeError."""

    def capture(model, inputs, target=None, *, layer=None, guided=False, channel_axis=-1):
        raise AssertionError("not called")

    @same_parameters(capture)
    def explain(*args, **kwargs):
        return arguments_of(explain, args, kwargs)

    assert explain("m", "x", [1, 2], layer="conv") == {
        "model": "m", "inputs": "x", "target": [1, 2], "layer": "conv", "guided": False, "channel_axis": -1}
    assert explain(model="m", inputs="x", guided=True) == {
        "model": "m", "inputs": "x", "target": None, "layer": None, "guided": True, "channel_axis": -1}
    with pytest.raises(TypeError, match="unexpected keyword argument 'call'"):
        explain("m", "x", call=1)
    with pytest.raises(TypeError, match="missing a required argument: 'inputs'"):
        explain("m")
    with pytest.raises(TypeError, match="too many positional arguments"):
        explain("m", "x", None, "conv")  # layer is keyword-only, as in capture
