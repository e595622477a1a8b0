"""Benchmarks (`make bench`, tools/bench_*.py): each compares two ways of doing the same work,
side by side in one process, and writes JSON + Markdown under benchmarks/."""
