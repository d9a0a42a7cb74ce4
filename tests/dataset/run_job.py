"""``python -m tests.dataset.run_job IMAGES OUT DELAY [metrics]``: a slow run for the kill and signal tests.

Prints "started" once the store exists; on Ctrl-C/SIGTERM prints the summary and exits 128 + signal.
With ``metrics``, the run also scores :data:`METRICS` (boxes from ``helpers.box_of``) in the same pass.
"""

import sys

import gradcam_ref
from gradcam_ref.dataset import Interrupted
from tests.dataset.helpers import SlowPreprocess, box_of, tiny_model

METRICS = {"metrics": ("deletion", "relevance_mass", "average_drop"), "boxes": box_of,
           "metric_options": {"steps": 6, "batch_size": 8}}


def main() -> int:
    images, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    extra = METRICS if sys.argv[4:] == ["metrics"] else {}
    try:
        summary = gradcam_ref.explain_dataset(tiny_model(), images, layer="2", out=out, batch_size=4,
                                              load=SlowPreprocess(delay), num_workers=0, threads=1, progress=False,
                                              **extra)
    except Interrupted as stop:
        print(f"interrupted {stop.signal} {stop.summary.computed_units}", flush=True)
        return 128 + stop.signal
    print(f"done {summary.computed_units}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
