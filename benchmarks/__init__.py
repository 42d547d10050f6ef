"""Benchmarks: this framework against what users would use instead, on the same work in the same run."""
