"""Benchmarks: run from the pack's folder as `python -m bench.<name>` (see bench/RESULTS.md)."""
