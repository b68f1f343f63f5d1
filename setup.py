"""Builds distsum's one C extension; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

# Histogram bucketing in C. Optional: without a C compiler the install goes on, and
# distsum._histogram buckets with numpy instead (the same histograms, slower).
setup(ext_modules=[Extension("distsum._bucketing", ["distsum/_bucketing.c"], optional=True)])
