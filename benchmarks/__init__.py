"""Benchmarks: scripts that print figures side by side (run with `python -m benchmarks.NAME`); see README.md."""
