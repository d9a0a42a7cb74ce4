"""The comparison tables of docs/evaluation.md, rendered from the recorded runs' JSON (docs/data/).

    python docs/evaluation_tables.py

prints the demo's table (``evaluation-demo.json``, with the methods of ``evaluation-demo-*.json``
runs merged in as further columns) and the lesion set's (``evaluation-lesions.json``): means over
examples, three decimals, "(k NaN)" where k examples have no value (a constant map in the
randomisation test). tests/test_docs.py checks that the page shows exactly these tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"

NAMES = {"grad-cam": "Grad-CAM", "grad-cam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgrad-cam": "XGrad-CAM",
         "layercam": "LayerCAM", "eigen-cam": "Eigen-CAM", "eigen-grad-cam": "Eigen-Grad-CAM",
         "fem": "FEM", "smooth-grad-cam++": "Smooth Grad-CAM++", "score-cam": "Score-CAM",
         "ablation-cam": "Ablation-CAM"}
ORDER = tuple(NAMES)

ROWS = {
    "demo": {"weakly_supervised_localisation": "box IoU (largest segment above 15% of the max)",
             "relevance_mass": "relevance mass in the tile", "deletion": "deletion AUC (20 steps, softmax)",
             "insertion": "insertion AUC (20 steps, blur baseline)", "average_drop": "average drop (fraction)",
             "increase_in_confidence": "increase in confidence (fraction)"},
    "lesions": {"weakly_supervised_localisation": "box IoU with the lesion's box",
                "relevance_mass": "relevance mass in the lesion"},
}
COMMON = {"pointing_game": "pointing game", "relevance_rank": "relevance rank accuracy",
          "localisation_auc": "localisation AUC", "deletion": "deletion AUC", "insertion": "insertion AUC",
          "average_drop": "average drop", "increase_in_confidence": "increase in confidence",
          "road_morf": "ROAD, most relevant imputed first (accuracy)",
          "road_lerf": "ROAD, least relevant imputed first (accuracy)"}


def load(kind: str) -> list[dict[str, Any]]:
    """The recorded runs of ``kind`` (``'demo'`` or ``'lesions'``): the main one first, then the
    ``evaluation-<kind>-*.json`` runs that add methods, in name order."""
    return [json.loads((DATA / f"evaluation-{kind}.json").read_text()),
            *(json.loads(p.read_text()) for p in sorted(DATA.glob(f"evaluation-{kind}-*.json")))]


def table(kind: str) -> str:
    """The Markdown table of ``kind``'s runs: metric x method (means), and which direction is better."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from gradcam_ref._evaluate import HIGHER_IS_BETTER

    summaries: dict[str, dict[str, Any]] = {}
    for run in load(kind):
        for method, result in run["methods"].items():
            summaries[{"gradcam": "grad-cam", "gradcam++": "grad-cam++"}.get(method, method)] = result["summary"]
    methods = sorted(summaries, key=ORDER.index)
    metrics = list(dict.fromkeys(k for s in summaries.values() for k in s))
    layers = [m for m in metrics if m.startswith("randomisation/")]
    lines = ["| metric | " + " | ".join(NAMES[m] for m in methods) + " | better |",
             "|---|" + "---|" * (len(methods) + 1)]
    for metric in metrics:
        if metric.startswith("randomisation/"):
            layer = metric.split("/", 1)[1]
            label = f"randomised `{layer}`" if metric == layers[0] else f"... and `{layer}`"
        else:
            label = ROWS[kind].get(metric, COMMON.get(metric, metric))
        better = "higher" if HIGHER_IS_BETTER.get(metric.split("/")[0], False) else "lower"
        cells = []
        for m in methods:
            s = summaries[m].get(metric)
            if s is None:
                cells.append("-")
            else:
                cells.append(f"{s['mean']:.3f}" + (f" ({s['undefined']} NaN)" if s["undefined"] else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {better} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for kind in ("demo", "lesions"):
        print(f"{kind}:\n\n{table(kind)}\n")
