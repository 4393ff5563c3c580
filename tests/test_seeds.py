"""The seed documents' code examples, run verbatim (extracted from ../shared/seeds at test time)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, SEEDS
from seed_code import examples

SEED_000 = SEEDS / "000-rendering-guide.txt"
SEED_001 = SEEDS / "001-training-functions.txt"


def seed_examples(path):
    if not path.is_file():
        pytest.skip(f"seed documents not found at {SEEDS}")
    return examples(path)


def run(blocks, namespace):
    for block in blocks:
        exec(compile(block.code, f"<seed: {block.title}>", "exec"), namespace)  # noqa: S102 - the seed's own code
    return namespace


@pytest.fixture
def embedded(monkeypatch):
    """No addresses configured: bios.ServiceClient() starts (or reuses) the in-process services."""
    monkeypatch.delenv("BIOS_TRAIN_ADDRESS", raising=False)
    monkeypatch.delenv("BIOS_RENDER_ADDRESS", raising=False)


@pytest.fixture(params=["embedded", "separate services"])
def deployment(request, monkeypatch):
    """Each seed runs twice: on the embedded default, and against services reached through BIOS_*_ADDRESS."""
    if request.param == "embedded":
        monkeypatch.delenv("BIOS_TRAIN_ADDRESS", raising=False)
        monkeypatch.delenv("BIOS_RENDER_ADDRESS", raising=False)
    else:
        render_address, train_address, _ = request.getfixturevalue("services")
        monkeypatch.setenv("BIOS_RENDER_ADDRESS", render_address)
        monkeypatch.setenv("BIOS_TRAIN_ADDRESS", train_address)
    return request.param


def test_seed000_first_example_runs_on_the_embedded_default(embedded, capsys):
    blocks = seed_examples(SEED_000)
    assert [b.title for b in blocks[:4]][1:] == [
        "Initialize the Renderer",
        "Remove the last assistant message and generate an alternative response:",
        "Sample from the model and parse the token output back into a message format:",
    ]
    run(blocks[:4], {})
    out = capsys.readouterr().out
    assert "Prompt object:\nModelInput(chunks=[EncodedTextChunk(tokens=[151644, 8948, 198," in out
    assert "<|im_start|>system\nAnswer concisely; at most one sentence per response<|im_end|>" in out
    assert out.rstrip().endswith("Parse success: False") or "Parse success: True" in out
    assert "Stop sequences: [151645]" in out and "Sampled tokens: [" in out


def test_seed000_every_example_runs(deployment, capsys):
    blocks = seed_examples(SEED_000)
    ns = run(blocks[:1], {})  # the example conversation
    ns.update(conversation_dataset=[ns["messages"]], num_epochs=1, financial_conversation=ns["messages"])
    run(blocks[1:], ns)
    out = capsys.readouterr().out
    assert "Training complete!" in out and "Assistant: " in out and "Parse successful: " in out
    assert "\033[31mThey evolved multiple protective mechanisms" in out  # format_colorized: the completion in red


def test_seed001_examples_run(deployment, capsys):
    import bios
    from bios_cookbook import renderers

    blocks = seed_examples(SEED_001)
    assert len(blocks) == 5, [b.title for b in blocks]
    service_client = bios.ServiceClient()
    training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8)
    tokenizer = training_client.get_tokenizer()
    renderer = renderers.get_renderer("ultrasafe", tokenizer)
    tokens, weights = renderer.build_supervised_example(
        [{"role": "user", "content": "Trend?"}, {"role": "assistant", "content": "Up, slowly."}]
    )
    from bios import types

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )
    ns = {
        "input_tokens": tokens[:-1],
        "target_tokens": tokens[1:],
        "loss_weights": weights[1:],
        "training_client": training_client,
        "sampling_client": training_client.save_weights_and_get_sampling_client(name="seed001"),
        "tokenizer": tokenizer,
        "dataloader": [[datum], [datum]],
    }
    assert asyncio.get_event_loop_policy() is not None
    run(blocks, ns)
    out = capsys.readouterr().out
    assert "Loss: " in out and "Step: 1" in out and "Sample 3: " in out
    assert "Checkpoint saved: bios://" in out and "Vocabulary size: 151643" in out
    assert out.count("Loss: ") == 3  # train() once, then train_async over two batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"service exited with {proc.returncode}"
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            time.sleep(0.3)
    raise TimeoutError(f"{address} not healthy after {timeout}s")


def test_seed000_first_example_against_separately_started_services(tmp_path):
    seed_examples(SEED_000)
    render_port, train_port = _free_port(), _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "render_service", "--host", "127.0.0.1", "--port", str(render_port)],
            env=env,
            cwd=REPO,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(train_port),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
            ],
            env=env,
            cwd=REPO,
        ),
    ]
    try:
        _wait_healthy(f"127.0.0.1:{render_port}", procs[0])
        _wait_healthy(f"127.0.0.1:{train_port}", procs[1])
        script = (
            "import sys; sys.path.insert(0, 'tests')\n"
            "from pathlib import Path\nfrom seed_code import examples\nimport bios_server.embedded\n"
            f"for b in examples(Path({str(SEED_000)!r}))[:4]: exec(compile(b.code, b.title, 'exec'))\n"
            "print('EMBEDDED', bios_server.embedded._addresses)\n"
        )
        env_client = {
            **env,
            "BIOS_RENDER_ADDRESS": f"127.0.0.1:{render_port}",
            "BIOS_TRAIN_ADDRESS": f"127.0.0.1:{train_port}",
        }
        done = subprocess.run(
            [sys.executable, "-c", script], env=env_client, cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Stop sequences: [151645]" in done.stdout
        assert "tokens=[151644, 8948, 198," in done.stdout
        assert "EMBEDDED {}" in done.stdout  # nothing was started in-process
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
