"""Cancelling frees the engine: a sample that would decode for minutes stops within a second of its cancel, and
the engine goes idle; other sessions' work is answered meanwhile."""

from __future__ import annotations

import time

import pytest

import bios
from bios import types
from train_service.metrics import DECODE_STEPS

FREED_WITHIN = 1.0  # seconds from the cancel to the end of the last decode step, and to empty engine queues


def decode_steps() -> float:
    return DECODE_STEPS._value.get()


def wait_until(condition, timeout: float) -> float | None:
    """Seconds until condition() held (polled every 10 ms), None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.01)
    return None


def last_decode_step_after(cancelled_at: float, quiet: float = 0.5, timeout: float = 30) -> float:
    """Seconds from the cancel to the end of the last decode step, once none has run for `quiet` seconds."""
    last_count, last_change = decode_steps(), cancelled_at
    while time.monotonic() - last_change < quiet and time.monotonic() - cancelled_at < timeout:
        time.sleep(0.005)
        if decode_steps() != last_count:
            last_count, last_change = decode_steps(), time.monotonic()
    return last_change - cancelled_at


@pytest.mark.parametrize("how", ["future.cancel()", "client.close(wait=False)"])
def test_cancel_frees_the_engine_within_a_second(services, how):
    render_address, train_address, train = services
    client = bios.ServiceClient(train_address=train_address, render_address=render_address)
    other = bios.ServiceClient(train_address=train_address, render_address=render_address)
    try:
        sampler = client.create_sampling_client(base_model="ultrasafe/usf-mini")
        trainer = other.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([100, 101, 102]),
            loss_fn_inputs={"target_tokens": [101, 102, 103], "weights": [1.0, 1.0, 1.0]},
        )
        before = decode_steps()
        # 64 sequences x 4000 tokens: minutes of decoding on this CPU, were it not cancelled
        future = sampler.sample(
            types.ModelInput.from_ints([100, 101]),
            types.SamplingParams(max_tokens=4000, temperature=1.0, seed=1),
            num_samples=64,
        )
        assert wait_until(lambda: decode_steps() - before >= 5, 60) is not None, "decoding never started"
        assert trainer.forward([datum]).result(30).metrics["loss:sum"] > 0  # others are served meanwhile
        steps_at_cancel = decode_steps() - before
        cancelled_at = time.monotonic()
        if how == "future.cancel()":
            assert future.cancel()
        else:
            client.close(wait=False)
        freed = last_decode_step_after(cancelled_at)
        assert freed < FREED_WITHIN, f"the last decode step ended {freed:.2f} s after the cancel"
        assert wait_until(lambda: train.engine.queue_depth() == 0, FREED_WITHIN) is not None
        assert steps_at_cancel < 3999 and decode_steps() - before < 3999
    finally:
        client.close(wait=False)
        other.close()
