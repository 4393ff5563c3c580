"""Token ids on the wire: packed `repeated int32` (the contract's choice) vs raw little-endian bytes.

Measures, for a realistic Qwen-vocabulary sequence, the encoded size and the time to build + serialize +
parse + read back a message holding the ids, from and to Python lists (what clients hold).
"""

from __future__ import annotations

import json
import time

import numpy as np

from bios.v1 import types_pb2


def _time(fn, repeats: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in (1024, 8192):
        ids = rng.integers(0, 151_936, n).tolist()

        def packed(ids=ids):
            wire = types_pb2.EncodedTextChunk(tokens=ids).SerializeToString()
            return list(types_pb2.EncodedTextChunk.FromString(wire).tokens)

        def raw_bytes(ids=ids, n=n):
            wire = types_pb2.Tensor(
                dtype=types_pb2.DTYPE_INT32, shape=[n], data=np.asarray(ids, dtype="<i4").tobytes()
            ).SerializeToString()
            return np.frombuffer(types_pb2.Tensor.FromString(wire).data, dtype="<i4").tolist()

        assert packed() == raw_bytes() == ids
        size_packed = len(types_pb2.EncodedTextChunk(tokens=ids).SerializeToString())
        size_bytes = len(
            types_pb2.Tensor(
                dtype=types_pb2.DTYPE_INT32, shape=[n], data=np.asarray(ids, dtype="<i4").tobytes()
            ).SerializeToString()
        )
        t_packed, t_bytes = _time(packed), _time(raw_bytes)
        rows.append(
            {
                "tokens": n,
                "packed_bytes": size_packed,
                "raw_bytes": size_bytes,
                "packed_us": t_packed * 1e6,
                "raw_us": t_bytes * 1e6,
                "time_ratio_packed_over_raw": t_packed / t_bytes,
                "size_ratio_packed_over_raw": size_packed / size_bytes,
            }
        )
    print("\n== contract: token ids on the wire ==")
    print(
        f"{'tokens':>7s} {'packed B':>9s} {'bytes B':>9s} {'size ratio':>10s} "
        f"{'packed us':>10s} {'bytes us':>9s} {'time ratio':>10s}"
    )
    for r in rows:
        print(
            f"{r['tokens']:7d} {r['packed_bytes']:9d} {r['raw_bytes']:9d} {r['size_ratio_packed_over_raw']:10.2f} "
            f"{r['packed_us']:10.1f} {r['raw_us']:9.1f} {r['time_ratio_packed_over_raw']:10.2f}"
        )
    print(json.dumps({"contract_bench": rows}))
    return rows


if __name__ == "__main__":
    main()
