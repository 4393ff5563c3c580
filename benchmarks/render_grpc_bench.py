"""The render service through gRPC, per family: the batched RPC vs HF `apply_chat_template` in-process.

The workload is render_bench's: its seeded, varied conversations for each family (tool calls and reasoning
where the family has them), the ones the family's HF template accepts. Each pass builds supervised examples
(ids + weights + attribution) for a batch of 256 of them in one `build_supervised_examples` call, through a
render server started as its own process on loopback (as deployed), against render_bench's HF baseline
(`apply_chat_template(tokenize=True)`) on the same conversations in this process, one at a time (one core).
Ids are checked equal to HF's.

Measured for a server rendering in its own process (--workers 1: one core) and with one render worker per
core of this machine (--workers N); each for first-time conversations (never rendered before) and a second
epoch of the same ones. The client sends 64-conversation chunks, up to three in flight. Each ratio is the
median over passes of (HF pass time / gRPC pass time), every gRPC pass timed next to an HF pass.

    python -m benchmarks.render_grpc_bench [family ...]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

from benchmarks import print_ratios
from benchmarks.render_bench import FAMILIES, FIXTURES, conversations, hf_baseline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 4.0
BATCH = 256
REPEATS = 5


def start_render_server(workers: int = 1):
    import socket
    import subprocess

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "render_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--workers",
            str(workers),
            "--allow-local-paths",
        ],  # the families' tokenizers are fixture directories
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return proc, f"127.0.0.1:{port}"
        except grpc.RpcError:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError("render server did not become healthy")


class Family:
    """One family's tokenizer, HF baseline and batches (each with HF's ids), shared by both server setups."""

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        self._hf = hf_baseline(spec)[1]
        self.source = spec.get("builtin") or str(FIXTURES / spec["fixture"])
        # Batch 0 warms up; the timed pass on batch k follows untimed ones on batch k - 1.
        self.batches = [self._accepted(seed) for seed in range(REPEATS + 1)]

    def hf(self, batch: list[dict]) -> list[Any]:
        return [self._hf(c["messages"], c["tools"]) for c in batch]

    def _accepted(self, seed: int) -> tuple[list[dict], list[list[int]]]:
        """BATCH conversations the HF template accepts (render_bench leaves the others out too), and their ids."""
        batch, ids, k = [], [], 0
        while len(batch) < BATCH:
            if k == 20:
                raise RuntimeError(f"{self.name}: HF's template rejected too many conversations ({len(batch)} kept)")
            for messages, tools in conversations(self.spec, BATCH, seed=1000 * seed + k):
                try:
                    ids.append(list(self._hf(messages, tools)))
                except Exception:  # noqa: BLE001 - HF's template refuses this conversation: not one to time
                    continue
                batch.append({"messages": messages, "tools": tools})
            k += 1
        return batch[:BATCH], ids[:BATCH]


def measure(client, family: Family, workers: int, cores: int) -> list[dict]:
    remote = client.render_client(
        family.name, family.source, **family.spec.get("options", {}), **family.spec.get("renderer_options", {})
    )
    for _ in range(3):  # every worker process loads the tokenizer and builds its encoders
        remote.build_supervised_examples(family.batches[0][0])
    first, second, hf = [], [], []
    for rep in range(1, REPEATS + 1):
        batch, reference = family.batches[rep]
        previous = family.batches[rep - 1][0][:64]
        # Each timed pass follows an untimed one of the same kind, as in a dataset rendered call after call:
        # otherwise whichever pass follows the other kind pays for the switch (~25% measured here).
        family.hf(previous)
        start = time.perf_counter()
        family.hf(batch)
        hf.append(time.perf_counter() - start)
        remote.build_supervised_examples(previous)
        start = time.perf_counter()
        remote.build_supervised_examples(batch)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        examples = remote.build_supervised_examples(batch)
        second.append(time.perf_counter() - start)
        assert [list(tokens) for tokens, _ in examples] == reference, f"{family.name}: ids differ from HF"
    where = f"{workers} render worker{'s' if workers > 1 else ''} on {cores} cores"
    rows = []
    for label, times in (("first-time", first), ("again", second)):
        ratio = statistics.median(h / t for h, t in zip(hf, times))
        flag = "" if label == "again" or ratio >= TARGET else "  [below target]"
        rows.append(
            {
                "name": f"{family.name:12s} {where}, {label}{flag}",
                "family": family.name,
                "workers": workers,
                "value": BATCH / statistics.median(times),
                "baseline": BATCH / statistics.median(hf),
                "ratio": ratio,
                "target": f">= {TARGET:g} (first-time)",
                "unit": "conversations/s",
            }
        )
    return rows


def main(names: list[str] | None = None) -> list[dict]:
    import bios

    families, notes = [], []
    for name, spec in FAMILIES.items():
        if names and name not in names:
            continue
        if "fixture" in spec and not (FIXTURES / spec["fixture"]).is_dir():
            notes.append(f"{name}: skipped (fixture {spec['fixture']} not found under {FIXTURES})")
            continue
        families.append(Family(name, spec))
    rows = []
    cores = len(os.sched_getaffinity(0))
    for workers in sorted({1, cores}):
        proc, address = start_render_server(workers)
        client = bios.ServiceClient(render_address=address)
        try:
            for family in families:
                rows += measure(client, family, workers, cores)
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
    for note in notes:
        print(note)
    return print_ratios(
        f"render service through gRPC: build_supervised_examples({BATCH} conversations) / HF "
        "in-process, render_bench's conversations, ids checked equal",
        "render_grpc_bench",
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
