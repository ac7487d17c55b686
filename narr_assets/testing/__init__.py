"""Test doubles and synthetic data shipped with the package (used by tests and benchmarks).

- `server.py`    an OpenAI-compatible server on 127.0.0.1 with latency and fault injection
- `generate.py`  production-shaped NVDRS-like files of any size (benchmarks, scale tests)
"""
