"""Evaluation suites: each module has `build(...) -> datasets.Dataset` and scoring helpers."""
