"""Benchmarks, each a module `<name>_bench.py` here with a `main()` that prints a table and a JSON line.

`python -m benchmarks` (what `make bench` runs) runs them all; `python -m benchmarks render_bench` runs one.
"""
