"""Benchmarks of gradcam_ref against a no-grad forward pass and the peers (``make bench``).

- :mod:`benchmarks.timing`: paired, interleaved ratios against a baseline of the same round;
- :mod:`benchmarks.models`, :mod:`benchmarks.methods`: the models, inputs and targets, and every
  method called as its library documents;
- :mod:`benchmarks.bench_torch` (time), :mod:`benchmarks.memory` (peak working memory, one
  process per measurement), :mod:`benchmarks.bench_core` (the math against a streaming pass),
  :mod:`benchmarks.bench_overhead` (fixed cost per call), :mod:`benchmarks.bench_jax` (jitted);
- :mod:`benchmarks.run` (``make bench``), :mod:`benchmarks.report` (tables, goals),
  :mod:`benchmarks.plot` (``docs/img/benchmarks.png``).
"""
