"""The figure of ``docs/benchmarks.md`` from a saved run.

    python -m benchmarks.plot [benchmarks/results.json] [-o docs/img/benchmarks.png]

Four panels, ratios on a log scale, the issue's goal for our method as a dashed line: time with
1 target per image, time with 10 targets for one image, peak working memory, and the core math
against a streaming pass.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks.report import MODEL_NAMES

GOALS = {"time1": 1.03, "time_multi": 1.15, "memory": 1.1, "core": 2.0}
COLORS = {"forward": "#999999", "gradcam_ref": "#d62728", "captum": "#1f77b4", "pytorch-grad-cam": "#2ca02c",
          "torchcam": "#9467bd", "mean-multiply-sum": "#8c564b", "einsum": "#17becf"}
HATCHES = {"T calls": "", "batch of copies": "//", "1 forward + T backward": ""}


def _style(method: str) -> dict[str, Any]:
    library, _, variant = method.partition(": ")
    color = COLORS.get("gradcam_ref" if library.startswith("gradcam_ref") else library, "#444444")
    return {"color": color, "hatch": HATCHES.get(variant, ""), "edgecolor": "white"}


def _bars(
    matplotlib: Any, ax: Any, groups: list[str], methods: list[str], value: Any, title: str, goal: float | None
) -> None:
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        xs, ys = [], []
        for j, group in enumerate(groups):
            v = value(group, method)
            if v is not None and v == v:
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(v)
        bars = ax.bar(xs, ys, width=width, label=method, **_style(method))
        ax.bar_label(bars, labels=[f"{y:.2f}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6, padding=1)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)
    ticks = [t for t in (0.5, 1, 1.1, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= ax.get_ylim()[1]]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axhline(1.0, color="black", linewidth=0.8)
    if goal is not None:
        ax.axhline(goal, color="#d62728", linewidth=1.0, linestyle="--", label=f"goal for gradcam_ref ({goal}x)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=3)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))

    def panel(ax: Any, chosen: list[dict], key: Any, title: str, goal: float | None) -> None:
        groups = list(dict.fromkeys(key(r) for r in chosen))
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        cell = {(key(r), r["method"]): r["ratio"] for r in chosen}
        _bars(matplotlib, ax, groups, methods, lambda g, m: cell.get((g, m)), title, goal)

    def config(r: dict) -> str:
        name = MODEL_NAMES.get(r["model"], r["model"])
        return f"{name}\nbatch {r['batch']}" + (f", {r['targets']} targets" if r["targets"] > 1 else "")

    time1 = [r for r in rows if r["suite"] == "time" and r["targets"] == 1 and r["method"] != "forward"]
    multi = [r for r in rows if r["suite"] == "time" and r["targets"] > 1 and r["method"] != "forward"]
    memory = [r for r in rows if r["suite"] == "memory" and r["method"] != "forward"]
    core = [r for r in rows if r["suite"] == "core" and not r["method"].startswith("streaming")]
    panel(axes[0, 0], time1, config, "time, 1 target per image (ratio to a no-grad forward)", GOALS["time1"])
    panel(axes[0, 1], multi, config, "time, 10 targets for one image (ratio to a no-grad forward)",
          GOALS["time_multi"])
    panel(axes[1, 0], memory, config, "peak working memory (ratio to the no-grad forward's)", GOALS["memory"])
    panel(axes[1, 1], core, lambda r: f"{r['library']} {r['dtype']}\n" + r["shape"].replace(" x ", "\nx "),
          "core math (ratio to a streaming pass over A and G)", GOALS["core"])
    info = result.get("machine", {})
    fig.suptitle(f"gradcam_ref benchmarks: {info.get('cpu', '?')}, {info.get('cpus', '?')} cores (shared), "
                 f"{info.get('threads', '?')} thread(s), torch {info.get('torch', '?')}; paired medians of ratios",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default="benchmarks/results.json")
    parser.add_argument("-o", "--output", default="docs/img/benchmarks.png")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    plot(result, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
