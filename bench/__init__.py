"""Benchmarks that print a comparison table and write JSON (not installed with the package)."""
