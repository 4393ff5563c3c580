"""The engine's scheduling: FIFO per model, round robin across models, step-wise generator jobs, isolation."""

from __future__ import annotations

import threading

import pytest

from bios.errors import UnavailableError
from train_service.engine import Engine


@pytest.fixture
def engine():
    e = Engine()
    yield e
    e.stop(5)


def hold(engine: Engine) -> threading.Event:
    """Block the engine thread until the returned event is set, so work can be queued deterministically."""
    gate, started = threading.Event(), threading.Event()
    engine.submit("gate", lambda: (started.set(), gate.wait(10)))
    started.wait(10)
    return gate


def test_fifo_per_key_and_round_robin_across_keys(engine):
    order = []
    gate = hold(engine)
    futures = [engine.submit(key, lambda k=key, i=i: order.append((k, i))) for key in ("a", "b") for i in range(3)]
    gate.set()
    for f in futures:
        f.result(10)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_generator_jobs_interleave_step_by_step(engine):
    order = []

    def long_job():
        for step in range(3):
            order.append(("sample", step))
            yield
        return "done"

    gate = hold(engine)
    sampled = engine.submit("sampler", long_job)
    trained = [engine.submit("model", lambda i=i: order.append(("train", i))) for i in range(2)]
    gate.set()
    assert sampled.result(10) == "done" and [f.result(10) for f in trained] == [None, None]
    assert order == [("sample", 0), ("train", 0), ("sample", 1), ("train", 1), ("sample", 2)]


def test_a_failing_job_fails_only_its_future(engine):
    def boom():
        raise ValueError("bad input")

    bad = engine.submit("a", boom)
    good = engine.submit("a", lambda: 42)
    other = engine.submit("b", lambda: 7)
    with pytest.raises(ValueError, match="bad input"):
        bad.result(10)
    assert good.result(10) == 42 and other.result(10) == 7


def test_stop_finishes_queued_work_and_refuses_new(engine):
    gate = hold(engine)
    queued = [engine.submit("a", lambda i=i: i) for i in range(3)]
    gate.set()
    engine.stop(10)
    assert [f.result(1) for f in queued] == [0, 1, 2]
    with pytest.raises(UnavailableError, match="shutting down"):
        engine.submit("a", lambda: 1).result(1)
    assert engine.queue_depth() == 0
