"""Benchmarks: every method and ablation on the benchmark data sets, and side-by-side timings.

``make bench`` (``feddymem bench suite``) runs :mod:`.suite` with the plan in
``configs/bench.yaml`` and writes ``benchmarks/results.md``, ``benchmarks/results.json`` and the
convergence plot; :mod:`.perf` holds the timing comparisons (K-means, scoring, cache, throughput).
"""
