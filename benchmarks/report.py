"""Tables of a benchmark run: progress lines while it runs, Markdown tables at the end.

    python -m benchmarks.report [benchmarks/results.json]

prints the Markdown tables of a saved run (what ``docs/benchmarks.md`` shows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable

MODEL_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0",
               "efficientnet_lite0_linen": "EfficientNet-Lite0 (Flax linen)", "tiny": "tiny"}


def _ratio(r: dict) -> str:
    value = r.get("ratio", math.nan)
    if value != value:  # NaN
        return "n/a"
    spread = f" ({r['q1']:.2f}-{r['q3']:.2f})" if "q1" in r else ""
    return f"{value:.2f}x{spread}"


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
"""The committed full run (``make bench`` writes it)."""

# (suite, targets: 1, >1 or None for any, method, limit): the goals for our method.
GOALS = (
    ("time", 1, "gradcam_ref", 1.03),
    ("time", "multi", "gradcam_ref", 1.15),
    ("memory", None, "gradcam_ref", 1.10),
    ("core", None, "gradcam_ref.grad_cam", 2.00),
    ("jax", None, "gradcam_ref.explain (jitted)", 1.05),
    ("jax", None, "gradcam_ref.explain (linen, layer=)", 1.05),
    ("tensorflow", 1, "gradcam_ref.explain", 1.05),
    ("tensorflow", "multi", "gradcam_ref.explain", 1.15),
    ("tensorflow memory", None, "gradcam_ref.explain", 1.10),
)

FAMILY_GOALS = {"gradient": 1.10, "ablation-cam": 2.0, "score-cam speed-up": 1.5}
"""Issue 14: every gradient method within 1.10x of a forward, Ablation-CAM within 2x, Score-CAM
at least 1.5x faster than pytorch-grad-cam's."""


def load(path: str = RESULTS) -> dict:
    """A saved run: ``{"machine", "plan", "rows", "elapsed_s", ...}``."""
    with open(path) as f:
        return json.load(f)


def writable(path: str) -> str:
    """``path`` if a file can be written there (``gradcam-ref``'s own check: nothing is made yet),
    the ``type=`` of a runner's ``--json``, so that a bad path fails at the start of a run, not
    after minutes of measuring."""
    from gradcam_ref.cli._common import UsageError, check_output

    try:
        check_output("--json", path, folder=False)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--json ")) from None
    return path


def save(path: str, document: object) -> None:
    """``document`` as JSON to ``path``, complete or absent (``gradcam_ref._files.write_json``)."""
    from gradcam_ref._files import write_json

    write_json(path, document, default=float)


def goals(result: dict) -> list[dict]:
    """Our method's ratio in each configuration against the issue's goal for it."""
    out = []
    for goal, targets, method, limit in GOALS:
        suite, key = ("tensorflow", "memory_ratio") if goal == "tensorflow memory" else (goal, "ratio")
        for r in result["rows"]:
            if r["suite"] != suite or r["method"] != method:
                continue
            if targets == 1 and r["targets"] != 1 or targets == "multi" and r["targets"] == 1:
                continue
            if suite == "core":
                where = f"{r['library']} {r['dtype']} {r['shape']}"
            else:
                where = f"{MODEL_NAMES.get(r['model'], r['model'])} b{r['batch']}"
                where += f", {r['targets']} targets" if r["targets"] > 1 else ""
            name = {"time": "time", "memory": "memory", "core": "core", "jax": "jax time",
                    "tensorflow": "tensorflow time", "tensorflow memory": "tensorflow memory"}[goal]
            out.append({"goal": name, "where": where, "ratio": r[key], "limit": limit,
                        "met": r[key] <= limit})
    return out


def family_goals(result: dict) -> list[dict]:
    """The CAM family's goals (:data:`FAMILY_GOALS`) against the ``family`` rows of a run."""
    rows = [r for r in result["rows"] if r["suite"] == "family"]
    ours = {r["method"]: r for r in rows if r["library"] == "gradcam_ref"}
    theirs = {r["method"]: r for r in rows if r["library"] == "pytorch-grad-cam"}
    out = []
    for method, r in ours.items():
        where = f"{MODEL_NAMES.get(r['model'], r['model'])} b{r['batch']} {method}"
        if method == "score-cam":
            if method in theirs:
                speedup = theirs[method]["ratio"] / r["ratio"]
                limit = FAMILY_GOALS["score-cam speed-up"]
                out.append({"goal": "family speed-up vs pgc", "where": where, "ratio": speedup, "limit": limit,
                            "met": speedup >= limit})
            continue
        limit = FAMILY_GOALS["ablation-cam" if method == "ablation-cam" else "gradient"]
        out.append({"goal": "family time", "where": where, "ratio": r["ratio"], "limit": limit,
                    "met": r["ratio"] <= limit})
    return out


def family_goals_text(result: dict) -> str:
    """One line per CAM-family goal (a speed-up must be at least its limit, a ratio at most)."""
    lines = []
    for g in family_goals(result):
        above = g["goal"].endswith("vs pgc")
        sign = (">=" if g["met"] else "<") if above else ("<=" if g["met"] else ">")
        lines.append(f"{g['goal']} | {g['where']} | {g['ratio']:.3f}x {sign} {g['limit']:.2f}x | "
                     f"{'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def family_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "family" and r["method"] != "forward"]
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    body = []
    for method in methods:
        mine = next((r for r in chosen if r["method"] == method and r["library"] == "gradcam_ref"), None)
        peer = next((r for r in chosen if r["method"] == method and r["library"] == "pytorch-grad-cam"), None)
        body.append([method, _ratio(mine) if mine else "n/a", _ratio(peer) if peer else "n/a",
                     f"{peer['ratio'] / mine['ratio']:.2f}x" if mine and peer else "n/a"])
    return _table(["method", "gradcam_ref", "pytorch-grad-cam 1.5.7", "speed-up"], body)


def goals_text(result: dict) -> str:
    """One line per goal: ``time | ResNet-50 b8 | 1.01x <= 1.03x | met``."""
    return "\n".join(
        f"{g['goal']} | {g['where']} | {g['ratio']:.3f}x {'<=' if g['met'] else '>'} {g['limit']:.2f}x | "
        f"{'met' if g['met'] else 'MISSED by ' + format(g['ratio'] - g['limit'], '.3f')}"
        for g in goals(result)
    )


def progress_lines(rows: Iterable[dict]) -> list[str]:
    """One short line per row, printed as the run goes."""
    lines = []
    for r in rows:
        where = f"{r.get('model', r.get('library', ''))} b{r.get('batch', '')} t{r.get('targets', '')}"
        if r["suite"] == "core":
            where = f"{r['library']} {r['dtype']} {r['shape']}"
        extra = f" {r['working_mib']:.1f} MiB" if r["suite"] == "memory" else f" {r.get('seconds', 0):.2e} s"
        ratio = f" {r['ratio']:.2f}x" if "ratio" in r else ""
        lines.append(f"[{r['suite']}] {where} {r['method']}:{ratio}{extra}")
    return lines


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def time_table(rows: list[dict], targets: int) -> str:
    """Methods down, (model, batch) across: time ratios to the no-grad forward."""
    chosen = [r for r in rows if r["suite"] == "time" and r["targets"] == targets]
    configs = list(dict.fromkeys((r["model"], r["batch"]) for r in chosen))
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    cell = {(r["model"], r["batch"], r["method"]): r for r in chosen}
    header = ["method"] + [f"{MODEL_NAMES.get(m, m)} b{b}" for m, b in configs]
    body = []
    for method in methods:
        body.append([method] + [_ratio(cell[(m, b, method)]) if (m, b, method) in cell else "-" for m, b in configs])
    seconds = ["forward, median s"] + [
        f"{cell[(m, b, 'forward')]['seconds']:.3f}" if (m, b, "forward") in cell else "-" for m, b in configs]
    rounds = ["rounds (cheap / costly)"] + [
        "/".join(sorted({str(r["rounds"]) for r in chosen if (r["model"], r["batch"]) == c}, key=int, reverse=True))
        for c in configs]
    return _table(header, body + [seconds, rounds])


def memory_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "memory"]
    configs = list(dict.fromkeys((r["model"], r["batch"], r["targets"]) for r in chosen))
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    cell = {(r["model"], r["batch"], r["targets"], r["method"]): r for r in chosen}
    header = ["method"] + [f"{MODEL_NAMES.get(m, m)} b{b}, {t} target{'s' if t > 1 else ''}"
                           for m, b, t in configs]
    body = []
    for method in methods:
        row = [method]
        for m, b, t in configs:
            r = cell.get((m, b, t, method)) or (cell.get((m, b, 1, method)) if method == "forward" else None)
            row.append(f"{r['ratio']:.2f}x ({r['working_mib']:.0f} MiB)" if r else "-")
        body.append(row)
    return _table(header, body)


def core_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "core"]
    body = [[r["library"], r["dtype"], r["shape"], r["method"], f"{r['ratio']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})",
             f"{r['seconds'] * 1e3:.3f}"] for r in chosen]
    return _table(["library", "dtype", "shape", "method", "ratio to streaming pass", "median ms"], body)


def setup_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "setup"]
    body = [[MODEL_NAMES.get(r["model"], r["model"]), r["method"], f"{r['ratio']:.3f}x",
             f"{r['seconds'] * 1e3:.2f}"] for r in chosen]
    return _table(["model", "setup (build explainer, hook, unhook)", "ratio to batch-1 forward", "median ms"], body)


def overhead_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "overhead" and r["method"] != "forward"]
    body = [[r["library"], str(r["targets"]), r["method"], f"{r['seconds'] * 1e3:.2f}", f"{r['extra_ms']:.2f}"]
            for r in chosen]
    return _table(["library", "targets", "method", "median ms", "ms more than the forward"], body)


def jax_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "jax"]
    body = [[MODEL_NAMES.get(r["model"], r["model"]), str(r["batch"]), str(r["targets"]), r["method"], _ratio(r),
             f"{r['seconds'] * 1e3:.2f}", f"{r.get('compile_s', math.nan):.2f}"] for r in chosen]
    return _table(["model", "batch", "targets", "method", "ratio to jitted forward", "median ms", "compile s"], body)


def tensorflow_table(rows: list[dict]) -> str:
    chosen = [r for r in rows if r["suite"] == "tensorflow"]
    body = [[MODEL_NAMES.get(r["model"], r["model"]), str(r["batch"]), str(r["targets"]), r["method"], _ratio(r),
             f"{r['seconds'] * 1e3:.1f}", f"{r['memory_ratio']:.2f}", f"{r['memory_mib']:.1f}"] for r in chosen]
    return _table(["model", "batch", "targets", "method", "ratio to compiled forward", "median ms",
                   "memory ratio", "memory MiB"], body)


def _metrics_table(rows: list[dict]) -> str:
    from benchmarks.bench_metrics import table  # imports gradcam_ref.metrics: only for that suite

    return table(rows)


def _sections() -> list[tuple[str, str, Callable[[list[dict]], str]]]:
    """(suite, heading, table) of every suite after "time", in the report's order."""
    return [
        ("setup", "Peers' setup cost", setup_table),
        ("memory", "Peak working memory (ratio to the no-grad forward's; MiB above the loaded model)", memory_table),
        ("core", "Core math against a streaming pass over the same arrays", core_table),
        ("overhead", "Fixed cost of one explanation (a model that is all head: A (1, 1280, 7, 7) -> 1000 scores)",
         overhead_table),
        ("jax", "JAX: jitted explain against the jitted forward", jax_table),
        ("metrics", "Metrics against Quantus 0.6 (same run)", _metrics_table),
        ("family", "The CAM family, ResNet-18 layer4, batch 1 (ratio to a no-grad forward)", family_table),
        ("tensorflow", "TensorFlow: explain against a compiled no-grad forward (Keras EfficientNet-Lite0)",
         tensorflow_table),
        ("dataset", "Data sets (EfficientNet-Lite0, batch 16, 1 thread per process)", dataset_table),
    ]


def markdown(result: dict) -> str:
    rows = result["rows"]
    parts = []
    suites = {r["suite"] for r in rows}
    if "time" in suites:
        parts += ["### Time, 1 target per image (ratio to a no-grad forward; quartiles in brackets)",
                  time_table(rows, 1)]
        multi = sorted({r["targets"] for r in rows if r["suite"] == "time" and r["targets"] > 1})
        for t in multi:
            parts += [f"### Time, {t} targets for one image (ratio to a no-grad forward of that image)",
                      time_table(rows, t)]
    for suite, heading, table in _sections():
        if suite in suites:
            parts += [f"### {heading}", table(rows)]
    return "\n\n".join(parts)


def dataset_table(rows: list[dict]) -> str:
    """explain_dataset's ratios (benchmarks/bench_dataset.py), one line each."""
    body = [[r["what"], "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x", r.get("detail", "")]
            for r in rows if r["suite"] == "dataset"]
    return _table(["measure", "ratio", "detail"], body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default=RESULTS)
    args = parser.parse_args(argv)
    result = load(args.json)
    print(markdown(result))
    print()
    print(goals_text(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
