"""Benchmarks of narr_assets (not tests): run `python benchmarks/run.py [--quick]`."""
