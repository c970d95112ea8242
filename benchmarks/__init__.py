"""Benchmarks of longnet_lightning; run each from the repository root as ``python -m benchmarks.<name>``.

Every number they produced is in ``benchmarks/RESULTS.md``, with its command.
"""
