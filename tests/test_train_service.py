"""The train service through the client against real servers on loopback: learning, every RPC, bad input."""

from __future__ import annotations

import math

import grpc
import pytest

from bios import types
from bios.compose import to_datum
from bios.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from bios_cookbook import renderers

CONV = [
    {"role": "system", "content": "Provide medical information accurately."},
    {"role": "user", "content": "What causes Type 2 diabetes?"},
    {"role": "assistant", "content": "Type 2 diabetes is caused by insulin resistance."},
]


@pytest.fixture(scope="module")
def renderer(qwen3_tokenizer):
    return renderers.get_renderer("ultrasafe", qwen3_tokenizer)


@pytest.fixture(scope="module")
def trained(client, renderer):
    """A model trained on CONV: (training_client, losses)."""
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=16)
    datum = to_datum(*renderer.build_supervised_example(CONV))
    losses = []
    for _ in range(40):
        # Submitted back to back: the optimizer step is queued before the forward_backward returns.
        fb = tc.forward_backward([datum], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return tc, losses


def test_stand_in_learns_and_reproduces_the_answer(trained, renderer):
    tc, losses = trained
    best = min(range(len(losses)), key=losses.__getitem__)
    assert losses[0] / losses[-1] >= 5, losses
    assert best >= 5
    prompt = renderer.build_generation_prompt(CONV[:-1])
    out = tc.sample(
        prompt, types.SamplingParams(max_tokens=30, temperature=0.0, stop=renderer.get_stop_sequences())
    ).result()
    message, ok = renderer.parse_response(out.sequences[0].tokens)
    assert ok and message["content"] == CONV[-1]["content"]
    assert out.sequences[0].stop_reason == "stop"
    assert tc.get_info().step == 40


def test_forward_matches_forward_backward_logprobs(client, renderer):
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    datum = to_datum(*renderer.build_supervised_example(CONV))
    forward = tc.forward([datum]).result()
    fb = tc.forward_backward([datum]).result()
    n = len(datum.model_input.to_ints())
    assert len(forward.loss_fn_outputs[0]["logprobs"].data) == n
    assert forward.loss_fn_outputs[0]["logprobs"].data == pytest.approx(fb.loss_fn_outputs[0]["logprobs"].data)
    weights = datum.loss_fn_inputs["weights"].data
    expected = -sum(w * lp for w, lp in zip(weights, forward.loss_fn_outputs[0]["logprobs"].data))
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_checkpoints_sampler_weights_and_every_rpc(client, trained, renderer):
    tc, _ = trained
    info = tc.get_info()
    assert (info.base_model, info.lora_rank, info.tokenizer) == ("ultrasafe/usf-mini", 16, "ultrasafe/usf-mini")
    state = tc.save_state(name="sft-40", metadata={"epoch": 1}).result()
    assert state.path.startswith("bios://") and state.id == state.path and state.step == 40
    assert state.metadata == {"epoch": 1}
    listed = {c.path for c in client.list_checkpoints(tc.model_id)}
    assert state.path in listed

    # A new training client from the saved state continues from the same weights and step.
    restored = client.create_training_client_from_state_with_optimizer(state.path)
    assert restored.get_info().step == 40
    datum = to_datum(*renderer.build_supervised_example(CONV))
    assert restored.forward([datum]).result().metrics["loss:sum"] == pytest.approx(
        tc.forward([datum]).result().metrics["loss:sum"], rel=1e-5
    )
    assert restored.load_state(state.path).result().step == 40

    sampler = tc.save_weights_and_get_sampling_client(name="sft-40-sampler")
    prompt = renderer.build_generation_prompt(CONV[:-1])
    params = types.SamplingParams(max_tokens=30, temperature=0.0, stop=renderer.get_stop_sequences())
    out = sampler.sample(prompt, params).result()
    assert renderer.parse_response(out.sequences[0].tokens) == (
        {"role": "assistant", "content": CONV[-1]["content"]},
        True,
    )

    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and len(logprobs) == len(prompt.to_ints()) and all(x <= 0 for x in logprobs[1:])

    base = client.create_sampling_client(base_model="ultrasafe/usf-mini")
    assert base.sample(prompt, params).result().sequences[0].tokens != out.sequences[0].tokens

    tokenizer = tc.get_tokenizer()
    assert tokenizer.encode("<|im_start|>system\n", add_special_tokens=False) == [151644, 8948, 198]

    client.delete_checkpoint(state.path)
    assert state.path not in {c.path for c in client.list_checkpoints()}
    with pytest.raises(NotFoundError, match="path: no checkpoint"):
        client.delete_checkpoint(state.path)


def test_tokenizer_files_are_served(client):
    from bios.v1 import train_pb2

    files = client._unary("GetTokenizer", train_pb2.GetTokenizerRequest(name="ultrasafe/usf-mini")).files
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)


def test_sampling_controls(client, renderer):
    sampler = client.create_sampling_client(base_model="ultrasafe/usf-mini")
    prompt = renderer.build_generation_prompt(CONV[:-1])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = sampler.sample(prompt, params, num_samples=3).result()
    b = sampler.sample(prompt, params, num_samples=3).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert all(len(s.tokens) == 8 and s.stop_reason == "length" for s in a.sequences)
    assert all(lp <= 0 for s in a.sequences for lp in s.logprobs)
    first = a.sequences[0].tokens[0]
    stopped = sampler.sample(prompt, params.model_copy(update={"stop": [first]}), num_samples=1).result()
    assert stopped.sequences[0].tokens == [first] and stopped.sequences[0].stop_reason == "stop"


def test_bad_input_gets_clear_status_and_session_stays_usable(client, renderer):
    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    tokens, weights = renderer.build_supervised_example(CONV)
    good = to_datum(tokens, weights)
    cases = [
        (
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[2:]},
            ),
            r"data\[0\].loss_fn_inputs\['weights'\]: length",
        ),
        (
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[2:], "weights": weights[1:]},
            ),
            r"data\[0\].loss_fn_inputs\['target_tokens'\]: length",
        ),
        (
            types.Datum(
                model_input=types.ModelInput.from_ints([999_999] + list(tokens[1:-1])),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
            ),
            r"data\[0\].model_input: token id 999999 is outside the vocabulary",
        ),
        (
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [math.nan] * (len(tokens) - 1)},
            ),
            r"weights'\]: contains NaN",
        ),
    ]
    before = tc.forward([good]).result().metrics["loss:sum"]
    for datum, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            tc.forward_backward([datum]).result()
    with pytest.raises(InvalidArgumentError, match="loss_fn: unknown loss 'hinge'"):
        tc.forward_backward([good], "hinge").result()
    with pytest.raises(InvalidArgumentError, match="save_state.name"):
        tc.save_state(name="../../etc/passwd").result()
    with pytest.raises(InvalidArgumentError, match="load_state.path"):
        tc.load_state("/etc/passwd").result()
    with pytest.raises(NotFoundError, match="load_state.path: no checkpoint"):
        tc.load_state("bios://model-000000000000/state/nothing").result()
    # Nothing above touched the model: same loss, and training still works.
    assert tc.forward([good]).result().metrics["loss:sum"] == pytest.approx(before)
    assert tc.train([good], learning_rate=1e-3).step == 1

    with pytest.raises(NotFoundError, match="base_model: unknown model 'nobody/nothing'"):
        client.create_lora_training_client(base_model="nobody/nothing")
    sampler = client.create_sampling_client(base_model="ultrasafe/usf-mini")
    prompt = types.ModelInput.from_ints([151644, 8948, 198])
    with pytest.raises(InvalidArgumentError, match="sampling_params.max_tokens: must be > 0"):
        sampler.sample(prompt, types.SamplingParams(max_tokens=0)).result()
    with pytest.raises(InvalidArgumentError, match="prompt: token id outside"):
        sampler.sample(types.ModelInput.from_ints([10**7]), types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(NotFoundError, match="model_path: no checkpoint"):
        client.create_sampling_client(model_path="bios://model-000000000000/sampler/none")
    assert sampler.sample(prompt, types.SamplingParams(max_tokens=2)).result().sequences[0].tokens


def test_resubmitted_sequence_number_returns_the_original_result(client, services):
    """Two requests with the same seq on the stream: one optimizer step, answered twice identically."""
    from bios import wire
    from bios.v1 import train_pb2, train_pb2_grpc

    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    step = train_pb2.OptimStepRequest(adam_params=types_adam())
    fb = train_pb2.ForwardBackwardInput(data=[wire.datum_to_pb(to_datum([1, 2, 3, 4], [0.0, 1.0, 1.0, 1.0]))])
    with grpc.insecure_channel(services[1]) as channel:
        stub = train_pb2_grpc.TrainServiceStub(channel)
        requests = [
            train_pb2.OperationRequest(seq=0, model_id=tc.model_id, forward_backward=fb),
            train_pb2.OperationRequest(seq=1, optim_step=step),
            train_pb2.OperationRequest(seq=1, optim_step=step),
            train_pb2.OperationRequest(seq=2, forward_backward=fb),
            train_pb2.OperationRequest(seq=3, optim_step=step),
            train_pb2.OperationRequest(seq=4, optim_step=step),
        ]
        events = list(stub.Operate(iter(requests)))
    assert [(e.seq, e.optim_step.step) for e in events if e.HasField("optim_step")] == [(1, 1), (1, 1), (3, 2)]
    # The last step had no gradient since the one before: refused, and the step count is unchanged.
    assert events[-1].seq == 4 and events[-1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "no gradient since the last step" in events[-1].error.message
    assert tc.get_info().step == 2
    with grpc.insecure_channel(services[1]) as channel:
        stub = train_pb2_grpc.TrainServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Operate(iter([train_pb2.OperationRequest(seq=0, model_id="model-nope", optim_step=step)])))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model_id" in err.value.details()


def types_adam():
    from bios import wire

    return wire.adam_params_to_pb(types.AdamParams(learning_rate=1e-3))


def test_load_state_of_another_base_model_is_refused(client, trained):
    tc, _ = trained
    sampler_ckpt = tc.save_weights_for_sampler(name="weights-only").result()
    with pytest.raises(FailedPreconditionError, match="no optimizer state"):
        tc.load_state_with_optimizer(sampler_ckpt.path).result()


def test_sampled_tokens_stream_before_the_result(client, renderer):
    import asyncio

    sampler = client.create_sampling_client(base_model="ultrasafe/usf-mini")
    prompt = renderer.build_generation_prompt(CONV[:-1])

    async def collect():
        return [
            event
            async for event in sampler.sample_stream(prompt, types.SamplingParams(max_tokens=6, seed=3), num_samples=2)
        ]

    events = asyncio.run(collect())
    deltas, final = events[:-1], events[-1]
    assert isinstance(final, types.SampleResponse) and len(deltas) >= 2
    for index in (0, 1):
        assert [t for i, toks in deltas if i == index for t in toks] == final.sequences[index].tokens


def test_engine_limits_and_refusals_name_the_field_and_the_model_keeps_working(client, renderer):
    from bios.errors import ResourceExhaustedError

    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
    info = tc.get_info()
    assert (info.device, info.dtype, info.max_context) == ("cpu", "float32", 4096)
    assert (info.max_request_tokens, info.max_pass_tokens) == (131072, 16384)
    # rank x (in + out) for q, k, v, o, gate, up, down, in each of the 2 layers
    assert info.lora_parameters == 4 * 2 * (128 + 96 + 96 + 128 + 3 * 192)
    assert info.device_memory_allocated_bytes > 0
    good = to_datum(*renderer.build_supervised_example(CONV))
    before = tc.forward([good]).result().metrics["loss:sum"]

    with pytest.raises(FailedPreconditionError, match="optim_step: no gradient since the last step"):
        tc.optim_step(types.AdamParams()).result()
    tc.forward_backward([good]).result()
    refused = [
        ({"eps": 0.0}, r"adam_params.eps: must be > 0, got 0"),
        ({"learning_rate": math.nan}, r"adam_params.learning_rate: must be a finite number >= 0, got nan"),
        ({"beta1": 1.0}, r"adam_params.beta1: must be in \[0, 1\), got 1"),
        ({"weight_decay": -1.0}, r"adam_params.weight_decay: must be a finite number >= 0"),
        ({"learning_rate": 3e38, "weight_decay": 1.0}, "would make weights non-finite"),
    ]
    for adam, message in refused:
        with pytest.raises(InvalidArgumentError, match=message):
            tc.optim_step(types.AdamParams(**adam)).result()
    assert tc.forward([good]).result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)  # nothing moved

    too_long = to_datum(list(range(5001)), [1.0] * 5001)
    with pytest.raises(
        InvalidArgumentError, match=r"data\[1\].model_input: 5000 tokens exceed the model context \(4096\)"
    ):
        tc.forward([good, too_long]).result()
    big = [to_datum(list(range(4001)), [1.0] * 4001)] * 33  # 132,000 tokens
    with pytest.raises(ResourceExhaustedError, match=r"max_request_tokens \(131072\)"):
        tc.forward_backward(big).result()
    for alpha in (math.nan, -math.inf, 0.0):
        with pytest.raises(InvalidArgumentError, match="lora.alpha: must be a finite number > 0"):
            client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, alpha=alpha)
    with pytest.raises(InvalidArgumentError, match="lora.rank: must be in 1..1024"):
        client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=2000)

    other = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8, train_mlp=False)
    state = other.save_state(name="rank8-attn").result()
    with pytest.raises(
        InvalidArgumentError,
        match=r"load_state.path: the checkpoint's LoRA \(rank 8, alpha 16, target "
        r"modules \['k_proj', 'o_proj', 'q_proj', 'v_proj'\]\) differs from "
        r"this model's \(rank 4, alpha 8, target modules \['down_proj'",
    ):
        tc.load_state(state.path).result()
    assert tc.train([good], learning_rate=1e-3).step == 1  # the model and the service keep working
