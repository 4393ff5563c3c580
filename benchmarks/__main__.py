"""Run every benchmark module in this package (or the ones named on the command line).

Each module's `main()` prints its own table and JSON line; one failing module does not stop the others.
A last JSON line gathers what every module returned: {"benchmarks": {module: rows | {"error": ...}}}.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def discover() -> list[str]:
    here = str(Path(__file__).resolve().parent)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.endswith("_bench"))


def main(argv: list[str]) -> int:
    available = discover()
    wanted = [name.removesuffix(".py") for name in argv] or available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        print(f"unknown benchmark module(s): {', '.join(unknown)}; available: {', '.join(available)}")
        return 2
    results: dict[str, object] = {}
    failed = []
    for name in wanted:
        print(f"\n##### benchmarks.{name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            results[name] = module.main()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next module
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        print(
            f"##### benchmarks.{name}: {'FAILED' if name in failed else 'done'} in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
    print(json.dumps({"benchmarks": results}, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
