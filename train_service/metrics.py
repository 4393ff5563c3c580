"""Train-service Prometheus metrics (names follow Prometheus conventions: units in names, _total counters)."""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

ACTIVE_SESSIONS = Gauge("bios_train_active_sessions", "Open training sessions.")
ACTIVE_ADAPTERS = Gauge("bios_train_active_adapters", "LoRA adapters held by training models and samplers.")
QUEUE_DEPTH = Gauge("bios_train_queue_depth", "Operations queued or running on the engine.")
OPERATION_SECONDS = Histogram(
    "bios_train_operation_duration_seconds",
    "Time from submission to answer per operation.",
    ["op"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TOKENS = Counter("bios_train_tokens", "Tokens processed, by kind (forward_backward, forward, sample).", ["kind"])
OPTIMIZER_STEPS = Counter("bios_train_optimizer_steps", "Optimizer steps taken.")
CHECKPOINT_BYTES = Counter("bios_train_checkpoint_bytes_written", "Bytes of checkpoints written.")
MEMORY_BYTES = Gauge("bios_process_memory_bytes", "Resident memory of the service process.")
PASSES = Counter("bios_train_passes", "Passes over a base model, by kind (forward, forward_backward).", ["kind"])
PASS_REQUESTS = Histogram(
    "bios_train_pass_requests",
    "Requests coalesced into one pass over a base model.",
    ["kind"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
PASS_TOKENS = Histogram(
    "bios_train_pass_tokens",
    "Real tokens in one pass over a base model.",
    ["kind"],
    buckets=(64, 256, 1024, 4096, 16384, 65536, 262144),
)
DECODE_STEPS = Counter("bios_train_decode_steps", "Decode steps of sampling groups.")
DECODE_ROWS = Histogram(
    "bios_train_decode_rows",
    "Sequences decoded together in one decode step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
DEVICE = Info("bios_train_device", "Where the train engine computes and the base weights' dtype.")
DEVICE_MEMORY_BYTES = Gauge(
    "bios_train_device_memory_bytes", "Memory on the engine's device (CUDA allocator; resident set on CPU).", ["kind"]
)


def _resident_bytes() -> float:
    with open("/proc/self/statm") as f:  # current resident set, in pages
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def record_operation(kind: str | None, started: float, future: Any) -> None:
    """Latency of each operation from submission to answer (a done callback), and what it processed."""
    OPERATION_SECONDS.labels(kind or "none").observe(time.perf_counter() - started)
    if future.cancelled() or future.exception() is not None:
        return
    event = future.result()
    if kind in ("forward", "forward_backward"):
        TOKENS.labels(kind).inc(event.forward_backward.metrics["tokens:sum"])
    elif kind == "optim_step":
        OPTIMIZER_STEPS.inc()


def record_pass(kind: str, requests: int, tokens: int) -> None:
    PASSES.labels(kind).inc()
    PASS_REQUESTS.labels(kind).observe(requests)
    PASS_TOKENS.labels(kind).observe(tokens)


def record_decode_step(rows: int) -> None:
    DECODE_STEPS.inc()
    DECODE_ROWS.observe(rows)


_bound: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # sessions -> engine of each server


def bind(sessions, engine, device) -> None:
    """Gauges read live state when scraped, summed over every train server of this process (one in production;
    tests and benchmarks start several)."""
    _bound[sessions] = engine
    ACTIVE_SESSIONS.set_function(lambda: sum(len(s.sessions) for s in list(_bound)))
    ACTIVE_ADAPTERS.set_function(
        lambda: sum(len(s.models) + sum(1 for x in s.samplers.values() if x.adapter) for s in list(_bound))
    )
    QUEUE_DEPTH.set_function(lambda: sum(e.queue_depth() for e in list(_bound.values())))
    MEMORY_BYTES.set_function(_resident_bytes)
    DEVICE.info(
        {
            "device": device.describe(),
            "dtype": device.dtype_name,
            "activation_checkpointing": str(device.activation_checkpointing).lower(),
        }
    )
    for kind in ("allocated", "peak", "total"):

        def read(kind: str = kind) -> float:
            return device.memory()[kind]

        DEVICE_MEMORY_BYTES.labels(kind).set_function(read)
