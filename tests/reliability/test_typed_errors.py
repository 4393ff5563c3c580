"""Typed errors only: a server bug is INTERNAL (generic message, logged with its traceback) whatever its Python
type; shutdown and lost workers are UNAVAILABLE, and the client retries those during a drain."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time

import pytest

import bios
from bios import types
from bios.errors import InternalError, UnavailableError
from bios.futures import LoopThread
from bios_server.metrics import GRPC_REQUESTS

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def requests(service: str, method: str, code: str, at_least: float = 0.0) -> float:
    """Calls a server answered with `code`; waits (a bounded while) for `at_least` of them: the server counts a
    call once its answer is sent, which may be after the client has read it."""
    deadline = time.monotonic() + 5
    while GRPC_REQUESTS.labels(service, method, code)._value.get() < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return GRPC_REQUESTS.labels(service, method, code)._value.get()


@pytest.mark.parametrize(
    "bug",
    [
        KeyError("messages"),
        LookupError("x"),
        ValueError("bad"),
        TypeError("int"),
        AttributeError("y"),
        RuntimeError("z"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_handler_bug_reaches_the_client_as_internal_and_is_logged(client, monkeypatch, caplog, bug):
    from render_service.service import RenderServicer

    remote = client.render_client("ultrasafe", "ultrasafe/usf-mini")
    expected = remote.render(CONV).token_ids

    def broken(self, spec):
        raise bug

    monkeypatch.setattr(RenderServicer, "_renderer", broken)
    with caplog.at_level(logging.ERROR, logger="bios.server"), pytest.raises(InternalError) as info:
        remote.render(CONV)
    message = str(info.value)
    error_id = re.search(r"error ([0-9a-f]{12})", message).group(1)
    assert message == f"INTERNAL: internal error (the server logged it as error {error_id})"  # nothing leaks
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info[1] is bug  # logged with its traceback, under the id the caller got
    monkeypatch.undo()
    assert remote.render(CONV).token_ids == expected  # and the server keeps serving


def test_an_operation_bug_is_internal_for_that_operation_only(client, monkeypatch, caplog):
    from train_service.sessions import TrainingModel

    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([100, 101, 102]),
        loss_fn_inputs={"target_tokens": [101, 102, 103], "weights": [1.0, 1.0, 1.0]},
    )
    before = tc.forward([datum]).result().metrics["loss:sum"]

    def broken(self, request):
        raise KeyError("step")

    monkeypatch.setattr(TrainingModel, "save_state", broken)
    with caplog.at_level(logging.ERROR, logger="bios.server"), pytest.raises(InternalError, match="internal error"):
        tc.save_state("x").result(60)
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)
    monkeypatch.undo()
    assert tc.forward([datum]).result().metrics["loss:sum"] == before  # the stream and the model go on
    assert tc.save_state("after-the-bug").result(60).step == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_engine_is_unavailable_and_the_client_retries(tmp_path, monkeypatch):
    from bios import service_client
    from train_service import server as train_server

    loop = LoopThread.named("test-typed-errors")
    running = loop.run(train_server.start("127.0.0.1", 0, str(tmp_path), device="cpu"))
    client = bios.ServiceClient(train_address=f"127.0.0.1:{running.port}")
    try:
        client.session_id  # noqa: B018 - opened before the drain
        running.engine.stop(5)  # what a drain does last; the gRPC server still answers
        monkeypatch.setattr(service_client, "UNARY_RETRIES", 3)
        attempts = requests("train", "CreateModel", "UNAVAILABLE")
        with pytest.raises(UnavailableError, match="train engine: shutting down"):
            client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
        assert requests("train", "CreateModel", "UNAVAILABLE", attempts + 4) - attempts == 4  # a try and 3 retries
    finally:
        client.close(wait=False)
        loop.run(running.stop(None, checkpoint=False))


def test_during_a_drain_the_client_retries_until_the_replacement_answers(tmp_path):
    """A call made while the server drains is refused UNAVAILABLE, retried, and answered by the server that
    replaces it on the same address (a pod restart)."""
    from train_service import server as train_server

    loop = LoopThread.named("test-typed-errors")
    port = free_port()
    first = loop.run(train_server.start("127.0.0.1", port, str(tmp_path / "a"), device="cpu"))
    client = bios.ServiceClient(train_address=f"127.0.0.1:{port}")
    replacement = None
    try:
        assert client.list_checkpoints() == []
        draining = loop.submit(first.stop(3.0, checkpoint=False))
        time.sleep(0.2)  # the drain has begun: new calls are refused
        answered = {}
        call = threading.Thread(target=lambda: answered.update(checkpoints=client.list_checkpoints()))
        started = time.monotonic()
        call.start()
        draining.result(30)
        time.sleep(1.0)  # the address answers nothing for a while: the client keeps retrying
        replacement = loop.run(train_server.start("127.0.0.1", port, str(tmp_path / "b"), device="cpu"))
        call.join(30)
        assert answered == {"checkpoints": []} and time.monotonic() - started > 1.0
    finally:
        client.close(wait=False)
        if replacement is not None:
            loop.run(replacement.stop(None, checkpoint=False))


def test_a_dead_render_worker_is_unavailable_and_the_retry_meets_a_new_pool(services):
    from render_service import server as render_server

    loop = LoopThread.named("test-typed-errors")
    running = loop.run(render_server.start("127.0.0.1", 0, workers=2))
    client = bios.ServiceClient(render_address=f"127.0.0.1:{running.port}", train_address=services[1])
    try:
        remote = client.render_client("ultrasafe", "ultrasafe/usf-mini")
        convs = [CONV] * 40
        expected = remote.build_supervised_examples(convs)
        victim = running.workers.pids()[0]
        os.kill(victim, signal.SIGKILL)
        # The pool learns of the death from its manager thread; until then a request can still complete on the
        # surviving worker (no error to see). Wait for it, bounded, so the next request meets the broken pool.
        deadline = time.monotonic() + 10
        while not running.workers._pool._broken and time.monotonic() < deadline:
            time.sleep(0.01)
        unavailable = requests("render", "RenderBatch", "UNAVAILABLE")
        assert remote.build_supervised_examples(convs) == expected  # retried on UNAVAILABLE, a new pool answered
        assert requests("render", "RenderBatch", "UNAVAILABLE", unavailable + 1) - unavailable >= 1
        assert victim not in running.workers.pids()
    finally:
        client.close(wait=False)
        loop.run(running.stop(None))


def test_renderer_options_are_what_the_template_reads(qwen3_tokenizer):
    from bios.errors import InvalidArgumentError
    from render_service.renderers import get_renderer

    template = "{% for m in messages %}{{ greeting }}{{ m['content'] }}{% endfor %}"
    renderer = get_renderer("chat_template", qwen3_tokenizer, chat_template=template, greeting="Hey: ")
    assert qwen3_tokenizer.decode(renderer.render([{"role": "user", "content": "x"}]).token_ids) == "Hey: x"
    with pytest.raises(InvalidArgumentError, match=r"renderer\.options\.farewell: the chat template does not read"):
        get_renderer("chat_template", qwen3_tokenizer, chat_template=template, farewell="Bye")
    with pytest.raises(InvalidArgumentError, match=r"renderer\.options\.date_string: not an option of the qwen3"):
        get_renderer("qwen3", qwen3_tokenizer, date_string="1 Jan 2025")
