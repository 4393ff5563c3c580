"""Nothing lost at exit: scripts on the embedded default that never wait (exit_drill.py), close() and `with` on a
client, and the bounded wait, reported when exceeded."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys

import exit_drill
import pytest

import bios
from bios import types
from bios.errors import FailedPreconditionError

RUNS = int(os.environ.get("BIOS_EXIT_DRILL_RUNS", "8"))  # + 2 other endings = 10 runs; 20: docs/reliability.md
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(list(range(100, 132))),
    loss_fn_inputs={"target_tokens": list(range(101, 133)), "weights": [1.0] * 32},
)


def test_every_unwaited_operation_is_applied_and_the_exit_code_is_the_scripts_own(tmp_path):
    reference = exit_drill.reference_weights(tmp_path)
    endings = ["exit"] * RUNS + ["exception", "sys.exit(3)"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda ending: exit_drill.run_once(tmp_path, reference, ending=ending), endings))
    for ending, run in zip(endings, runs):
        assert run.code == exit_drill.EXPECTED_CODE[ending], (ending, run.stderr)
        assert run.step == exit_drill.STEPS and run.weights_match, (ending, run)
        assert "Traceback" not in run.stderr or ending == "exception", run.stderr
        assert "terminate called" not in run.stderr and "exiting without them" not in run.stderr


WITH_SCRIPT = """
import os, sys
import bios
from bios import types

checkpoints = os.environ["BIOS_CHECKPOINT_DIR"]
datum = types.Datum(model_input=types.ModelInput.from_ints([100, 101, 102]),
                    loss_fn_inputs={"target_tokens": [101, 102, 103], "weights": [1.0, 1.0, 1.0]})
with bios.ServiceClient() as service_client:
    training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    for _ in range(5):
        training_client.forward_backward([datum])
        training_client.optim_step(types.AdamParams(learning_rate=1e-3))
    training_client.save_state("after-with")
from bios_server import embedded
saved = [p for p in os.listdir(checkpoints) if os.path.isdir(os.path.join(checkpoints, p, "state", "after-with"))]
print("saved before exit:", len(saved), "services running:", sorted(embedded._addresses))
"""


def test_leaving_a_with_block_waits_and_stops_the_embedded_services(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WITH_SCRIPT],
        env=exit_drill.env(tmp_path),
        cwd=exit_drill.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved before exit: 1 services running: []" in done.stdout


BOUNDED_SCRIPT = """
import bios
from bios import types

training_client = bios.ServiceClient().create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(100, 2100))),
                    loss_fn_inputs={"target_tokens": list(range(101, 2101)), "weights": [1.0] * 2000})
for _ in range(500):
    training_client.forward_backward([datum])
"""


def test_the_exit_wait_is_bounded_and_reported(tmp_path):
    env = exit_drill.env(tmp_path) | {"BIOS_EXIT_WAIT_SECONDS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED_SCRIPT],
        env=env,
        cwd=exit_drill.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "operations still unanswered after 2 s ($BIOS_EXIT_WAIT_SECONDS); exiting without them" in done.stderr
    assert "terminate called" not in done.stderr


def test_a_remote_clients_close_waits_for_its_operations(services, caplog):
    render_address, train_address, _ = services
    client = bios.ServiceClient(train_address=train_address, render_address=render_address)
    training_client = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    for _ in range(10):
        training_client.forward_backward([DATUM])
        training_client.optim_step(types.AdamParams(learning_rate=1e-3))
    saved = training_client.save_state("close-waits")
    assert client.wait_for_operations(0) > 0  # still in flight when close() is called
    client.close()
    assert saved.done() and saved.result().step == 10
    other = bios.ServiceClient(train_address=train_address, render_address=render_address)
    try:
        assert [c.step for c in other.list_checkpoints(training_client.model_id)] == [10]
    finally:
        other.close()

    hurried = bios.ServiceClient(train_address=train_address, render_address=render_address)
    training_client = hurried.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    for _ in range(20):
        training_client.forward_backward([DATUM])
    with caplog.at_level(logging.WARNING, logger="bios"):
        hurried.close(timeout=0)  # the bound: reported, not waited
    assert any("still unanswered" in r.getMessage() for r in caplog.records)


def test_a_closed_client_does_not_start_the_embedded_services_again(monkeypatch):
    monkeypatch.delenv("BIOS_RENDER_ADDRESS", raising=False)
    client = bios.ServiceClient(train_address="127.0.0.1:1")
    client.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        client.render_client("ultrasafe", "ultrasafe/usf-mini").render([{"role": "user", "content": "Hi"}])
