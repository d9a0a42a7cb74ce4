"""``make bench``: every benchmark in one run, as ratios against a baseline of the same run.

    python -m benchmarks.run [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from benchmarks import bench_core


def machine() -> dict:
    import numpy as np

    info = {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "numpy": np.__version__}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under 2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE")
    args = parser.parse_args(argv)
    rows = bench_core.run(quick=args.quick)
    print(f"machine: {machine()}")
    print(f"{'suite':6} {'library':7} {'dtype':8} {'method':40} {'ratio':>7} {'median s':>10}")
    for r in rows:
        print(f"{r['suite']:6} {r['library']:7} {r['dtype']:8} {r['method']:40} {r['ratio']:7.2f} {r['seconds']:10.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
