"""Benchmarks: print a table and write bench/results/*.json. Not tests: nothing here asserts."""
