"""``python -m benchmarks [--quick]``: run every benchmark and write benchmarks/results/ (see benchmarks/run.py)."""
from benchmarks.run import main

main()
