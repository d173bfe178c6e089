"""Benchmarks of the consumer, the rebuild, the report API and the downloads.

Run each one from the repository root as ``python -m bench.<name> --help``;
docs/benchmarks.md lists the commands and the recorded figures.
"""
