"""Benchmarks that print Markdown tables (results in ``docs/benchmarks.md``).  Run them from the repository
root as files (``python benchmarks/x.py``) or modules (``python -m benchmarks.x``)."""
