"""Benchmarks: ``make bench`` (``python -m bench``). Never run as tests."""
