"""The client: futures, pipelining, reconnects without double execution, composition, CLI, a torch-free install."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

import bios
from bios import types
from bios.futures import LoopThread
from bios_cookbook import renderers

CONVS = [
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}],
]


@pytest.fixture(scope="module")
def data(qwen3_tokenizer):
    renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    from bios.compose import to_datum

    return [to_datum(*renderer.build_supervised_example(c)) for c in CONVS]


def test_futures_sync_async_done_cancel(client, data):
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    fut = tc.forward_backward(data)
    assert fut.result(timeout=60).metrics["loss:sum"] > 0 and fut.done()

    async def seed004_style():
        fb = await tc.forward_backward_async(data, loss_fn="cross_entropy")  # returns once submitted...
        opt = await tc.optim_step_async(types.AdamParams(learning_rate=1e-3))
        return await fb, await opt  # ...and the future is awaited separately

    fb, opt = asyncio.run(seed004_style())
    assert fb.metrics["loss:sum"] > 0 and opt.step == 1
    result = asyncio.run(tc.train_async(data, loss_fn="cross_entropy", learning_rate=1e-3))
    assert isinstance(result, types.TrainingResult) and result.step == 2
    with pytest.raises(bios.errors.DeadlineExceededError):
        tc.forward_backward(data * 8).result(timeout=0.0001)
    queued = [tc.forward(data) for _ in range(3)]
    queued[-1].cancel()  # best effort: an operation already sent keeps running
    assert queued[0].result().metrics["loss:sum"] > 0


def test_back_to_back_operations_run_in_submission_order(client, data):
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    futures = []
    for _ in range(5):  # nothing waits between submissions
        futures.append(tc.forward_backward(data))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)))
    steps = [f.result().step for f in futures[1::2]]
    assert steps == [1, 2, 3, 4, 5]


class FlakyProxy:
    """A loopback TCP proxy whose connections can be cut, to force UNAVAILABLE on open streams."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.loop = LoopThread.named("test-proxy")
        self.writers: list[asyncio.StreamWriter] = []
        self.server = self.loop.run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        async def close_all():
            for w in self.writers:
                w.transport.abort()
            self.writers.clear()

        self.loop.run(close_all())


def test_stream_reconnects_and_nothing_runs_twice(services, data):
    render_address, train_address, _ = services
    proxy = FlakyProxy(int(train_address.rsplit(":", 1)[1]))
    client = bios.ServiceClient(train_address=f"127.0.0.1:{proxy.port}", render_address=render_address)
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    futures = [f for _ in range(3) for f in (tc.forward_backward(data), tc.optim_step(types.AdamParams()))]
    assert [f.result().step for f in futures[1::2]] == [1, 2, 3]
    futures = [f for _ in range(3) for f in (tc.forward_backward(data * 4), tc.optim_step())]
    time.sleep(0.05)
    proxy.cut()  # mid-flight: the client reconnects and resends what is unanswered
    assert [f.result(timeout=120).step for f in futures[1::2]] == [4, 5, 6]  # each step ran exactly once
    assert tc.get_info().step == 6
    client.close()


def test_unary_calls_retry_until_the_service_is_up(services, tmp_path):
    """The train service starts a moment after the client: CreateSession is retried with backoff until it answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "train_service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    try:
        client = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address=services[0])
        assert client.session_id.startswith("session-")
    finally:
        proc.terminate()
        proc.wait(60)


def test_train_on_conversations_and_chat(client):
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8)
    results = tc.train_on_conversations(CONVS * 2, epochs=8, batch_size=2, learning_rate=1e-2, progress=False)
    assert [r.step for r in results] == list(range(1, 17))
    assert results[-1].loss < results[0].loss / 5
    reply = tc.chat(CONVS[0][:1])
    assert reply.ok and reply.message == {"role": "assistant", "content": "Seven."}
    attribution = reply.prompt_attribution
    assert attribution.token_ids[:3] == [151644, 872, 198]
    assert attribution.content_mask_for_roles({"user"}).count(True) == 4  # "Name a prime." is 4 tokens
    sampler = tc.save_weights_and_get_sampling_client(name="chat")
    assert sampler.chat(CONVS[1][:1]).message["content"] == "Teal."


@pytest.mark.network  # pip installs the light client's dependencies into a fresh virtualenv
def test_client_installs_and_runs_without_torch(tmp_path, services, data):
    """A fresh virtualenv with only the light client's dependencies trains and samples through the services."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, str(REPO / "clients" / "python")], capture_output=True, text=True, timeout=600)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"package index unreachable: {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = f"""
import importlib.util, sys
import bios
from bios import types
assert not any(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")), "heavy deps present"
client = bios.ServiceClient(render_address={services[0]!r}, train_address={services[1]!r})
tokens, weights = client.render_client("ultrasafe", "ultrasafe/usf-mini").build_supervised_example(
    [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello."}}])
datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={{"target_tokens": tokens[1:], "weights": weights[1:]}})
tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
print("loss", tc.train([datum], learning_rate=1e-3).loss)
out = tc.sample(types.ModelInput.from_ints(tokens[:3]), types.SamplingParams(max_tokens=2)).result()
tokenizer = tc.get_tokenizer()  # through the train service: this install has no transformers
assert type(tokenizer).__name__ == "ServedTokenizer", type(tokenizer)
assert tokenizer.encode("Hello.", add_special_tokens=False) == tokens[-4:-2], (tokenizer.encode("Hello."), tokens)
assert tokenizer.decode(tokens) == "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello.<|im_end|>\\n"
assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
assert "im_start" in tokenizer.chat_template
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print("sampled", len(out.sequences[0].tokens), heavy)
try:  # no address: the embedded default, which this install cannot run
    bios.ServiceClient().list_checkpoints()
except bios.BiosError as exc:
    print("embedded:", type(exc).__name__, exc)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOS_")}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sampled 2 []" in done.stdout
    assert "embedded: FailedPreconditionError train_address: no address given" in done.stdout
    assert "needs the full install" in done.stdout


def test_a_client_that_only_renders_starts_no_train_service():
    """Services (and channels) come up on first use: rendering with the embedded default never loads torch."""
    code = """
import sys, bios
from bios_server import embedded
client = bios.ServiceClient()
tokens = client.render_client("ultrasafe", "ultrasafe/usf-mini").build_generation_prompt(
    [{"role": "user", "content": "hi"}]).to_ints()
print(tokens[:3], sorted(embedded._addresses), "torch" in sys.modules)
client.close()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOS_")} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[151644, 872, 198] ['render'] False"
