"""Benchmarks of grafit-tf. Each is a module run from the repository root:
`python -m bench.<name> --help` (e.g. `python -m bench.quality`); bench/runs.py holds what
they share, bench/results/ what they wrote.
"""
