"""docs/evaluation.md shows the recorded runs as measured: its comparison tables are the ones
docs/evaluation_tables.py renders from the JSON in docs/data/, digit for digit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent.parent / "docs"


def _tables() -> object:
    spec = importlib.util.spec_from_file_location("evaluation_tables", DOCS / "evaluation_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["demo", "lesions"])
def test_the_page_shows_the_recorded_numbers(kind):
    tables = _tables()
    rendered = tables.table(kind)
    assert rendered in (DOCS / "evaluation.md").read_text(), f"the {kind} table differs from docs/data: " + rendered
    runs = tables.load(kind)
    methods = {m for run in runs for m in run["methods"]}
    header = rendered.splitlines()[0]
    assert all(tables.NAMES[m] in header for m in methods)  # every recorded method has its column
    first = runs[0]["methods"]["grad-cam"]["summary"]["pointing_game"]["mean"]
    assert f"| pointing game | {first:.3f} |" in rendered


def test_a_missing_value_is_a_dash_and_nan_counts_are_shown(tmp_path, monkeypatch):
    tables = _tables()
    summary = {"pointing_game": {"mean": 0.5, "std": 0.5, "n": 2, "undefined": 0},
               "randomisation/fc": {"mean": -0.25, "std": 0.0, "n": 1, "undefined": 1}}
    (tmp_path / "evaluation-demo.json").write_text(json.dumps({"methods": {"grad-cam": {"summary": summary}}}))
    (tmp_path / "evaluation-demo-more.json").write_text(json.dumps(
        {"methods": {"score-cam": {"summary": {"pointing_game": summary["pointing_game"]}}}}))
    monkeypatch.setattr(tables, "DATA", tmp_path)
    assert tables.table("demo").splitlines()[2:] == [
        "| pointing game | 0.500 | 0.500 | higher |",
        "| randomised `fc` | -0.250 (1 NaN) | - | lower |"]
