"""What a forward costs by batch size on a CPU: user time, system time and page faults per input.

    python -m benchmarks.bench_batch_memory [--size 224,448] [--batches 2,8,32] [--rounds 4]

Score-CAM scores ``batch_size`` masked inputs per forward (default 32). On this machine the recorded
demo run of docs/evaluation.md spent more system time than user time (283 s against 196 s, 136
million minor page faults): glibc serves every allocation above its mmap threshold (at most 32 MB)
with a fresh ``mmap``, and EfficientNet-Lite0's first activations for 32 inputs are larger than
that, so every batch touches new pages. This measures it with ``getrusage`` of the process (one
torch thread), rounds alternating in random order, medians per input, the load average beside them.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
from collections.abc import Sequence
from typing import Any


def rows(model: Any, size: int, batches: Sequence[int], rounds: int = 4, total: int = 32,
         seed: int = 0) -> list[dict]:
    """``{"size", "batch", "user_s", "system_s", "faults"}`` per input (medians over ``rounds``),
    ``total`` inputs scored ``batch`` at a time under ``torch.inference_mode`` in channels-last."""
    import torch

    x = torch.randn(total, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def once(batch: int) -> tuple[float, float, float]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        with torch.inference_mode():
            for start in range(0, total, batch):
                model(x[start:start + batch].contiguous(memory_format=torch.channels_last))
        after = resource.getrusage(resource.RUSAGE_SELF)
        return ((after.ru_utime - before.ru_utime) / total, (after.ru_stime - before.ru_stime) / total,
                (after.ru_minflt - before.ru_minflt) / total)

    for batch in batches:  # warm-up
        once(batch)
    times: dict[int, list[tuple[float, float, float]]] = {b: [] for b in batches}
    order = list(batches)
    for _ in range(rounds):
        random.Random(seed).shuffle(order)
        seed += 1
        for batch in order:
            times[batch].append(once(batch))
    return [{"size": size, "batch": b, "user_s": statistics.median(t[0] for t in v),
             "system_s": statistics.median(t[1] for t in v), "faults": statistics.median(t[2] for t in v),
             "load_average": os.getloadavg()} for b, v in times.items()]


def table(result: list[dict]) -> str:
    lines = ["| input | batch | user s / input | system s / input | minor page faults / input | load |",
             "|---|---|---|---|---|---|"]
    for r in result:
        lines.append(f"| {r['size']} x {r['size']} | {r['batch']} | {r['user_s']:.4f} | {r['system_s']:.4f} | "
                     f"{r['faults']:.0f} | {r['load_average'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="224,448", help="input sides, comma-separated")
    parser.add_argument("--batches", default="2,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    from gradcam_ref.zoo import efficientnet_lite0

    torch.set_num_threads(1)
    model = efficientnet_lite0.load_torch().eval().to(memory_format=torch.channels_last)
    result = []
    for size in (int(s) for s in args.size.split(",")):
        result += rows(model, size, [int(b) for b in args.batches.split(",")], rounds=args.rounds)
    print(table(result))
    return 0


if __name__ == "__main__":
    from benchmarks.run import set_threads

    set_threads(1)
    raise SystemExit(main())
