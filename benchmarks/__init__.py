"""Benchmarks of carzero_fast: `python -m benchmarks` (the CLI) and pytest-benchmark tests."""
