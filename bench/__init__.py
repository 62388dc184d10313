"""Benchmark harness: ``python -m bench.run`` (or ``make bench``) writes docs/benchmarks.md."""
