"""Benchmarks: each measures our code and a baseline in the same run and prints JSON last."""
