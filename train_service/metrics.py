"""Train-service Prometheus metrics (names follow Prometheus conventions: units in names, _total counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_SESSIONS = Gauge("bios_train_active_sessions", "Open training sessions.")
QUEUE_DEPTH = Gauge("bios_train_queue_depth", "Operations queued or running on the engine.")
OPERATION_SECONDS = Histogram("bios_train_operation_duration_seconds", "Engine time per operation.", ["op"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
TOKENS = Counter("bios_train_tokens", "Tokens processed, by kind (forward_backward, forward, sample).", ["kind"])
OPTIMIZER_STEPS = Counter("bios_train_optimizer_steps", "Optimizer steps taken.")
CHECKPOINT_BYTES = Counter("bios_train_checkpoint_bytes_written", "Bytes of checkpoints written.")
MEMORY_BYTES = Gauge("bios_process_memory_bytes", "Resident memory of the service process.")


def _resident_bytes() -> float:
    import os

    with open("/proc/self/statm") as f:  # current resident set, in pages
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def bind(sessions, engine) -> None:
    """Gauges read live state when scraped."""
    ACTIVE_SESSIONS.set_function(lambda: len(sessions.sessions))
    QUEUE_DEPTH.set_function(engine.queue_depth)
    MEMORY_BYTES.set_function(_resident_bytes)
