"""Benchmarks of narr_assets (not tests): run `python -m benchmarks.run [--quick]` from the project root."""
