"""Every RenderService RPC through the client against a real server on loopback, and its bad input."""

from __future__ import annotations

import pytest

from bios import types
from bios.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from bios_cookbook import renderers

CONV = [
    {"role": "system", "content": "Provide medical information accurately."},
    {"role": "user", "content": "What causes Type 2 diabetes?"},
    {"role": "assistant", "content": "Mostly insulin resistance."},
]


@pytest.fixture(scope="module")
def remote(client):
    return client.render_client("ultrasafe", "ultrasafe/usf-mini")


@pytest.fixture(scope="module")
def local(qwen3_tokenizer):
    return renderers.get_renderer("ultrasafe", qwen3_tokenizer)


def test_list_renderers(remote):
    names = {info.name: list(info.aliases) for info in remote.list_renderers()}
    assert "chatml" in names["ultrasafe"]


def test_remote_equals_local(remote, local):
    assert remote.build_generation_prompt(CONV[:-1]) == local.build_generation_prompt(CONV[:-1])
    assert remote.build_supervised_example(CONV) == local.build_supervised_example(CONV)
    assert remote.get_stop_sequences() == local.get_stop_sequences() == [151645]
    assert remote.get_stop_strings() == ["<|im_end|>"]
    r, here = remote.render(CONV, add_generation_prompt=True), local.render(CONV, add_generation_prompt=True)
    assert (r.token_ids, r.message_indices, r.message_roles, r.sampled_mask, r.is_content) == (
        here.token_ids,
        here.message_indices,
        here.message_roles,
        here.sampled_mask,
        here.is_content,
    )


def test_prefill_over_grpc(remote, local):
    assert remote.build_generation_prompt(CONV[:-1], prefill="Mostly") == local.build_generation_prompt(
        CONV[:-1], prefill="Mostly"
    )


def test_batched_render(remote, local):
    convs = [CONV, CONV[:2] + [{"role": "assistant", "content": "Genes and lifestyle."}]]
    assert remote.build_supervised_examples(convs) == [local.build_supervised_example(c) for c in convs]


def test_batched_render_takes_jsonl_records_with_tools(client, qwen3_tokenizer):
    remote = client.render_client("qwen2.5", "ultrasafe/usf-mini")  # a family that renders tools
    local = renderers.get_renderer("qwen2.5", qwen3_tokenizer)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a term up.",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    records = [{"messages": CONV, "tools": tools}, {"messages": CONV}, CONV]
    assert remote.build_supervised_examples(records) == [
        local.build_supervised_example(CONV, tools=tools),
        local.build_supervised_example(CONV),
        local.build_supervised_example(CONV),
    ]
    assert remote.build_supervised_examples(records)[0] != remote.build_supervised_examples(records)[1]
    with pytest.raises(InvalidArgumentError, match=r"conversations\[1\]\.messages: missing"):
        remote.build_supervised_examples([CONV, {"tools": tools}])


def varied(n: int) -> list[list[dict]]:
    return [
        [
            CONV[0],
            {"role": "user", "content": f"Question {k}: {'why ' * (k % 7)}über 数据 🙂?"},
            {"role": "assistant", "content": f"Answer {k}." + " more" * (k % 5)},
        ]
        for k in range(n)
    ]


def test_large_batches_go_in_chunks_and_errors_name_the_callers_index(remote, local):
    from bios import render_client

    convs = varied(2 * render_client.BATCH_CHUNK + 9)  # three requests, two of them in flight at once
    assert remote.build_supervised_examples(convs) == [local.build_supervised_example(c) for c in convs]
    bad = list(convs)
    bad[render_client.BATCH_CHUNK + 6] = [{"role": "robot", "content": "x"}]
    with pytest.raises(InvalidArgumentError, match=rf"conversations\[{render_client.BATCH_CHUNK + 6}\]\.messages\[0\]"):
        remote.build_supervised_examples(bad)


def test_render_worker_processes(services, local):
    """A server with two render processes cuts a batch into slices: same examples, same order, same errors."""
    import bios
    from bios.futures import LoopThread
    from render_service import server as render_server

    loop = LoopThread.named("test-services")
    render = loop.run(render_server.start("127.0.0.1", 0, workers=2))
    client = bios.ServiceClient(train_address=services[1], render_address=f"127.0.0.1:{render.port}")
    try:
        remote = client.render_client("ultrasafe", "ultrasafe/usf-mini")
        convs = varied(150)
        assert remote.build_supervised_examples(convs) == [local.build_supervised_example(c) for c in convs]
        assert len(render.workers.pids()) == 2
        bad = list(convs)
        bad[100] = [CONV[0], {"role": "robot", "content": "x"}]  # second request, second slice: in a worker
        with pytest.raises(InvalidArgumentError, match=r"conversations\[100\]\.messages\[1\]\.role: unknown"):
            remote.build_supervised_examples(bad)
        with pytest.raises(NotFoundError, match="no/such-model"):  # an error raised in a worker keeps its status
            client.render_client("ultrasafe", "no/such-model").build_supervised_examples(convs[:40])
        assert remote.build_supervised_examples(convs[:40]) == [local.build_supervised_example(c) for c in convs[:40]]
    finally:
        client.close()
        loop.run(render.stop(None))


def test_parse_response(remote, qwen3_tokenizer):
    tokens = qwen3_tokenizer.encode("Mostly insulin resistance.<|im_end|>", add_special_tokens=False)
    message, ok = remote.parse_response(tokens)
    assert ok and message == {"role": "assistant", "content": "Mostly insulin resistance."}


def test_bad_requests_get_clear_status_and_server_keeps_serving(client, remote):
    with pytest.raises(InvalidArgumentError, match="renderer: unknown renderer 'nope'"):
        client.render_client("nope", "ultrasafe/usf-mini").render(CONV)
    with pytest.raises(NotFoundError, match="unknown model 'no/such-model'"):
        client.render_client("ultrasafe", "no/such-model").render(CONV)
    with pytest.raises(InvalidArgumentError, match=r"messages\[1\].role: unknown role 'robot'"):
        remote.render([CONV[0], {"role": "robot", "content": "beep"}])
    with pytest.raises(InvalidArgumentError, match=r"messages\[1\].content: missing"):
        remote.render([CONV[0], {"role": "user"}])
    with pytest.raises(InvalidArgumentError, match=r"messages\[0\].content: expected a string"):
        remote.render([{"role": "user", "content": 42}])
    with pytest.raises(InvalidArgumentError, match=r"conversations\[1\].messages\[0\].role"):
        remote.build_supervised_examples([CONV, [{"role": "robot", "content": "x"}]])
    with pytest.raises(InvalidArgumentError, match="train_on_what"):
        remote.build_supervised_example(CONV, train_on_what="everything")
    assert remote.get_stop_sequences() == [151645]  # still serving


def test_health_and_reflection(services):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for address in services[:2]:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert names & {"bios.v1.RenderService", "bios.v1.TrainService"}
            assert "grpc.health.v1.Health" in names


def test_types_model_input_printing():
    prompt = types.ModelInput.from_ints([1, 2])
    assert str(prompt) == "ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2], type='encoded_text')])"


def test_declarative_templates_over_grpc(client, local, tmp_path):
    bundled = client.render_client("declarative:chatml", "ultrasafe/usf-mini")
    assert bundled.build_supervised_example(CONV) == local.build_supervised_example(CONV)
    outside = tmp_path / "mine.json"
    outside.write_text("{}")
    with pytest.raises(InvalidArgumentError, match="not under \\$BIOS_TEMPLATES_DIR"):
        client.render_client(f"declarative:{outside}", "ultrasafe/usf-mini").render(CONV)
    with pytest.raises(InvalidArgumentError, match="not under"):
        client.render_client("declarative:/etc/passwd", "ultrasafe/usf-mini").render(CONV)


def test_oversized_conversation_is_refused(remote):
    from render_service.batch import MAX_BYTES_PER_CONVERSATION

    huge = [{"role": "user", "content": "x" * (MAX_BYTES_PER_CONVERSATION + 1)}]
    with pytest.raises(ResourceExhaustedError, match="messages: .* over the limit"):
        remote.render(huge)
    assert remote.get_stop_sequences() == [151645]


def test_bridge_over_grpc_equals_local(remote, local, qwen3_tokenizer):
    from render_service.renderers.bridge import bridge_to_next_turn

    prompt = local.build_generation_prompt(CONV[:-1])
    completion = qwen3_tokenizer.encode(CONV[-1]["content"] + "<|im_end|>", add_special_tokens=False)
    turn = [{"role": "user", "content": "And type 1?"}]
    theirs, reason = remote.bridge_to_next_turn(prompt, completion, turn, history=CONV[:-1])
    ours, _ = bridge_to_next_turn(local, prompt, completion, turn, history=CONV[:-1])
    assert reason == "ok" and theirs.token_ids == ours.token_ids
    assert theirs.token_ids == local.render(CONV + turn, add_generation_prompt=True).token_ids
    refused, why = remote.bridge_to_next_turn(prompt, completion[:-1], turn)
    assert refused is None and "stop token" in why


def test_jsonl_to_data_streams_over_grpc(remote, local, tmp_path):
    import json

    from render_service.datasets import iter_jsonl_data

    path = tmp_path / "chats.jsonl"
    rows = [{"messages": CONV}, {"messages": CONV[:2] + [{"role": "assistant", "content": "Another answer."}]}]
    path.write_text("\n".join(json.dumps(rows[i % 2]) for i in range(600)) + "\n\n")
    streamed = list(remote.conversations_to_data(str(path), lines_per_request=64))
    assert streamed == list(iter_jsonl_data(path, local)) and len(streamed) == 600

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(InvalidArgumentError, match=r"line 2: field messages\[0\].role"):
        list(remote.conversations_to_data(str(bad)))
