"""Benchmarks, each a module `<name>_bench.py` here with a `main()` that prints a table and a JSON line.

`python -m benchmarks` (what `make bench` runs) runs them all; `python -m benchmarks render_bench` runs one.
"""

import json


def print_ratios(title: str, key: str, rows: list[dict]) -> list[dict]:
    """The common report: one line per measurement (value, baseline measured in the same run, ratio, target),
    then the rows as one JSON line under `key`."""
    print(f"\n== {title} ==")
    print(f"{'benchmark':72s} {'value':>11s} {'baseline':>11s} {'ratio':>7s}  target")
    for r in rows:
        print(f"{r['name']:72s} {r['value']:11.4g} {r['baseline']:11.4g} {r['ratio']:7.3f}  {r['target']}")
    print(json.dumps({key: rows}))
    return rows
