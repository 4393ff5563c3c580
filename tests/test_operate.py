"""Operating the services: Prometheus metrics, API keys and tenants, TLS, graceful SIGTERM and restart."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import REPO

import bios
from bios import types
from bios.errors import NotFoundError, UnauthenticatedError
from bios.futures import LoopThread
from bios_server.auth import ApiKeys

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def datum(renderer):
    tokens, weights = renderer.build_supervised_example(CONV)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


@pytest.fixture(scope="module")
def metrics_port():
    from bios_server.metrics import serve_metrics

    port = free_port()
    serve_metrics(port, "127.0.0.1")
    return port


def test_metrics_move_after_real_traffic(services, metrics_port, qwen3_tokenizer):
    from bios_cookbook import renderers

    client = bios.ServiceClient(render_address=services[0], train_address=services[1])

    renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    before = scrape(metrics_port)
    remote = client.render_client("ultrasafe", "ultrasafe/usf-mini")
    remote.build_supervised_example(CONV)
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    tc.train([datum(renderer)], learning_rate=1e-3)
    tc.save_state(name="metrics").result()
    tc.sample(renderer.build_generation_prompt(CONV[:1]), types.SamplingParams(max_tokens=3)).result()
    client.close()  # the operation stream ends with a half-close: OK on the server, not CANCELLED
    for _ in range(50):  # until the server has seen the stream end, however it ended
        after = scrape(metrics_port)
        if not after.get('bios_grpc_requests_in_flight{method="Operate",service="train"}'):
            break
        time.sleep(0.1)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('bios_grpc_requests_total{code="OK",method="BuildSupervisedExample",service="render"}') == 1
    assert moved('bios_grpc_requests_total{code="OK",method="CreateModel",service="train"}') == 1
    assert moved('bios_grpc_requests_total{code="OK",method="Operate",service="train"}') == 1
    assert not any(k.startswith("bios_grpc_requests_total") and 'code="CANCELLED"' in k and moved(k) for k in after)
    assert moved('bios_grpc_request_duration_seconds_count{method="Sample",service="train"}') == 1
    assert moved('bios_render_conversations_total{renderer="ultrasafe"}') >= 1
    assert moved('bios_render_tokens_total{renderer="ultrasafe"}') >= len(datum(renderer).model_input.to_ints())
    assert moved('bios_train_tokens_total{kind="forward_backward"}') > 0
    assert moved('bios_train_tokens_total{kind="sample"}') == 3
    assert moved("bios_train_optimizer_steps_total") == 1
    assert moved("bios_train_checkpoint_bytes_written_total") > 0
    assert moved('bios_train_operation_duration_seconds_count{op="optim_step"}') == 1
    assert "bios_train_active_sessions" in after and "bios_train_queue_depth" in after
    assert after["bios_process_memory_bytes"] > 50e6
    assert 'bios_grpc_requests_in_flight{method="Render",service="render"}' in after or any(
        k.startswith("bios_grpc_requests_in_flight") for k in after
    )


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Both services with API keys for two tenants."""
    from render_service import server as render_server
    from train_service import server as train_server

    keys = ApiKeys({"key-a": "tenant-a", "key-b": "tenant-b"})
    loop = LoopThread.named("test-secured-services")
    render = loop.run(render_server.start("127.0.0.1", 0, keys))
    train = loop.run(train_server.start("127.0.0.1", 0, str(tmp_path_factory.mktemp("ckpt")), keys))
    yield f"127.0.0.1:{render.port}", f"127.0.0.1:{train.port}"
    loop.run(render.stop(None))
    loop.run(train.stop(None))


def test_no_key_is_unauthenticated_but_health_is_open(secured):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    render_address, train_address = secured
    nobody = bios.ServiceClient(train_address=train_address, render_address=render_address)
    with pytest.raises(UnauthenticatedError, match="authorization"):
        nobody.render_client("ultrasafe", "ultrasafe/usf-mini").get_stop_sequences()
    with pytest.raises(UnauthenticatedError, match="authorization"):
        nobody.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    wrong = bios.ServiceClient(train_address=train_address, render_address=render_address, api_key="wrong")
    with pytest.raises(UnauthenticatedError):
        wrong.list_checkpoints()
    a = bios.ServiceClient(train_address=train_address, render_address=render_address, api_key="key-a")
    assert a.render_client("ultrasafe", "ultrasafe/usf-mini").get_stop_sequences() == [151645]
    for address in secured:  # Kubernetes probes carry no key
        with grpc.insecure_channel(address) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == 1


def test_tenants_cannot_see_each_other(secured, qwen3_tokenizer):
    from bios_cookbook import renderers

    render_address, train_address = secured
    a = bios.ServiceClient(train_address=train_address, render_address=render_address, api_key="key-a")
    b = bios.ServiceClient(train_address=train_address, render_address=render_address, api_key="key-b")
    renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    tc = a.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    tc.train([datum(renderer)], learning_rate=1e-3)
    state = tc.save_state(name="private").result()
    weights = tc.save_weights_for_sampler(name="private-weights").result()
    sampler = a.create_sampling_client(model_path=weights.path)

    assert state.path in {c.path for c in a.list_checkpoints()}
    assert b.list_checkpoints() == []
    with pytest.raises(NotFoundError):
        b._get_info(tc.model_id)
    with pytest.raises(NotFoundError):
        b.create_training_client_from_state(state.path)
    with pytest.raises(NotFoundError):
        b.create_sampling_client(model_path=weights.path)
    with pytest.raises(NotFoundError):
        b.delete_checkpoint(state.path)
    with pytest.raises(NotFoundError):
        b.export_weights(weights.path, "/tmp/should-not-exist")
    prompt = types.ModelInput.from_ints([151644, 872, 198])
    stolen = bios.SamplingClient(b, sampler_id=sampler.sampler_id)
    with pytest.raises(NotFoundError, match="sampler_id"):
        stolen.sample(prompt, types.SamplingParams(max_tokens=2)).result()
    stolen_model = bios.SamplingClient(b, model_id=tc.model_id)
    with pytest.raises(NotFoundError, match="model_id"):
        stolen_model.sample(prompt, types.SamplingParams(max_tokens=2)).result()
    hijack = bios.TrainingClient(b, tc.get_info())
    with pytest.raises(NotFoundError, match="model_id"):
        hijack.optim_step().result()
    # Tenant A is untouched and still works.
    assert tc.get_info().step == 1 and state.path in {c.path for c in a.list_checkpoints()}
    assert sampler.sample(prompt, types.SamplingParams(max_tokens=2)).result().sequences[0].tokens


def test_tls_connection_with_a_test_certificate(tmp_path, monkeypatch):
    from render_service import server as render_server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a test certificate: {made.stderr.decode()[-200:]}")
    monkeypatch.setenv("BIOS_TLS_CERT", str(cert))
    monkeypatch.setenv("BIOS_TLS_KEY", str(key))
    loop = LoopThread.named("test-tls")
    render = loop.run(render_server.start("127.0.0.1", 0, health_port=0))
    monkeypatch.delenv("BIOS_TLS_CERT")
    monkeypatch.delenv("BIOS_TLS_KEY")
    try:
        from bios.channel import open_channel
        from bios.v1 import render_pb2, render_pb2_grpc

        async def ask(tls: bool):
            channel = open_channel(f"localhost:{render.port}", str(cert) if tls else None)
            try:
                stub = render_pb2_grpc.RenderServiceStub(channel)
                return await stub.ListRenderers(render_pb2.ListRenderersRequest(), timeout=5)
            finally:
                await channel.close()

        assert any(r.name == "ultrasafe" for r in loop.run(ask(True)).renderers)
        with pytest.raises(grpc.aio.AioRpcError):
            loop.run(ask(False))  # plaintext to a TLS port fails

        # Kubelet probes speak plaintext: the health-only port answers them, and answers nothing else.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{render.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service="bios.v1.RenderService"), timeout=5).status == 1
            with pytest.raises(grpc.RpcError) as err:
                render_pb2_grpc.RenderServiceStub(channel).ListRenderers(render_pb2.ListRenderersRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        loop.run(render.stop(None))


def test_sigterm_drains_and_restart_lists_checkpoints(tmp_path, qwen3_tokenizer):
    from test_seeds import _wait_healthy

    from bios_cookbook import renderers

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BIOS_DRAIN_SECONDS": "20"}
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
        str(tmp_path / "ckpt"),
    ]
    render_address = "127.0.0.1:1"  # unused by these calls
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(f"127.0.0.1:{port}", proc)
        client = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address=render_address)
        renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
        tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
        saved = tc.save_state(name="before-restart").result()
        in_flight = [tc.forward_backward([datum(renderer)] * 8) for _ in range(4)]
        proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in in_flight]  # finished, not dropped
        assert all(r.metrics["loss:sum"] > 0 for r in results)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
        assert re.search(r"drained: checkpointed 1 open models", log), log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    try:
        _wait_healthy(f"127.0.0.1:{port}", proc)
        again = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address=render_address)
        paths = {c.path for c in again.list_checkpoints()}
        assert saved.path in paths
        assert f"bios://{tc.model_id}/state/drain-step0" in paths
        restored = again.create_training_client_from_state(saved.path)
        assert restored.get_info().base_model == "ultrasafe/usf-mini"
    finally:
        proc.terminate()
        proc.wait(60)


def test_api_key_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"k1": "team-1"}}))
    keys = ApiKeys.from_file(path)
    assert keys.tenant("Bearer k1") == "team-1" and keys.tenant("Bearer k2") is None and keys.tenant(None) is None
