"""Training semantics through gRPC: checkpoint round trips, exported adapters, multi-tenancy, custom losses."""

from __future__ import annotations

import threading

import pytest
import torch

import bios
from bios import types
from bios_cookbook import renderers

CONVS = [
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal is a colour."}],
]


@pytest.fixture(scope="module")
def data(qwen3_tokenizer):
    renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    out = []
    for conv in CONVS:
        tokens, weights = renderer.build_supervised_example(conv)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
            )
        )
    return out


def steps(tc, data, n, lr=5e-3):
    return [tc.train(data, learning_rate=lr).loss for _ in range(n)]


def test_save_load_continue_equals_continuing(client, data):
    a = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8, seed=11)
    steps(a, data, 3)
    state = a.save_state(name="roundtrip").result()
    continued = steps(a, data, 2)
    b = client.create_training_client_from_state_with_optimizer(state.path)
    assert steps(b, data, 2) == pytest.approx(continued, rel=1e-6)
    # Without the optimizer state the next step differs (fresh Adam moments), but the weights are the same.
    c = client.create_training_client_from_state(state.path)
    assert c.get_info().step == 0
    first = c.forward(data).result().metrics["loss:sum"]
    d = client.create_training_client_from_state_with_optimizer(state.path)
    assert d.forward(data).result().metrics["loss:sum"] == pytest.approx(first, rel=1e-6)
    # load_state into an existing client restores the same weights too.
    e = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8, seed=99)
    e.load_state_with_optimizer(state.path).result()
    assert steps(e, data, 2) == pytest.approx(continued, rel=1e-6)


def test_exported_adapter_loads_in_plain_peft_with_the_same_logits(client, data, tmp_path):
    from peft import PeftModel

    from train_service.tiny_model import build_tiny_qwen3

    tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8, seed=5)
    steps(tc, data, 3)
    ckpt = tc.save_weights_for_sampler(name="export-me").result()
    adapter_dir = client.export_weights(ckpt.path, tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter_dir.iterdir()}

    served = tc.forward(data[:1]).result().loss_fn_outputs[0]["logprobs"].to_torch()
    ids = torch.tensor([data[0].model_input.to_ints()])
    targets = torch.tensor(data[0].loss_fn_inputs["target_tokens"].data)
    peft_model = PeftModel.from_pretrained(build_tiny_qwen3(), str(adapter_dir)).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0]
    local = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(local, served, rtol=1e-4, atol=1e-4)

    merged_dir = client.export_weights(ckpt.path, tmp_path / "merged", merged=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert AutoTokenizer.from_pretrained(str(merged_dir)).encode("<|im_end|>") == [151645]
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits[0]
    torch.testing.assert_close(merged_logits, logits, rtol=1e-3, atol=1e-3)


def test_two_sessions_train_concurrently_as_if_alone(client, services, data):
    """Interleaved on one base model, each session's losses equal a run of it alone."""
    import bios

    render_address, train_address, running = services
    alone = {}
    for i, datum in enumerate(data):
        tc = client.create_lora_training_client(base_model="ultrasafe/usf-conversation", rank=8, seed=i)
        alone[i] = steps(tc, [datum], 6)

    other = bios.ServiceClient(train_address=train_address, render_address=render_address)  # a second tenant
    clients = [
        client.create_lora_training_client(base_model="ultrasafe/usf-conversation", rank=8, seed=0),
        other.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=8, seed=1),
    ]
    together: dict[int, list[float]] = {}

    def run(i: int) -> None:
        together[i] = steps(clients[i], [data[i]], 6)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Equal up to float32 summation order: the two sessions' rows may share a pass over the base.
    for i in range(2):
        assert together[i] == pytest.approx(alone[i], rel=1e-6)
    # usf-mini and usf-conversation name the same stand-in weights: one copy serves every adapter.
    bases = [b for b in running.sessions.pool.loaded() if b.weights == "tiny:qwen3"]
    assert len(bases) == 1
    assert {running.sessions.models[c.model_id].base.causal_lm for c in clients} == {bases[0].causal_lm}
    # ... and each model keeps its own name.
    assert [c.get_info().base_model for c in clients] == ["ultrasafe/usf-conversation", "ultrasafe/usf-mini"]
    other.close()


def test_forward_backward_custom_equals_builtin_cross_entropy(client, data):
    a = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, seed=2)
    b = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, seed=2)

    def custom(batch, logprobs):
        loss = sum(-(torch.tensor(d.loss_fn_inputs["weights"].data) * lp).sum() for d, lp in zip(batch, logprobs))
        return loss, {"custom": 1.0}

    out = a.forward_backward_custom(data, custom).result()
    builtin = b.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-5)
    assert out.metrics["custom"] == 1.0
    a.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    b.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert a.forward(data).result().metrics["loss:sum"] == pytest.approx(
        b.forward(data).result().metrics["loss:sum"], rel=1e-4
    )


def test_stop_strings_end_sampling(client, qwen3_tokenizer):
    sampler = client.create_sampling_client(base_model="ultrasafe/usf-mini")
    prompt = types.ModelInput.from_ints(qwen3_tokenizer.encode("Once upon a time", add_special_tokens=False))
    free = sampler.sample(prompt, types.SamplingParams(max_tokens=12, temperature=0.0)).result().sequences[0]
    text = qwen3_tokenizer.decode(free.tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    out = sampler.sample(prompt, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])).result()
    seq = out.sequences[0]
    assert seq.stop_reason == "stop" and stop in qwen3_tokenizer.decode(seq.tokens)
    assert stop not in qwen3_tokenizer.decode(seq.tokens[:-1])
    assert seq.tokens == free.tokens[: len(seq.tokens)]


def test_lora_layer_selection(client, data, services):
    """train_attn / train_mlp / train_unembed choose the LoRA targets; each choice trains."""
    running = services[2]
    for kwargs, expected in [
        ({"train_mlp": False}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ({"train_attn": False}, {"gate_proj", "up_proj", "down_proj"}),
        (
            {"train_unembed": True},
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
        ),
    ]:
        tc = client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, **kwargs)
        model = running.sessions.models[tc.model_id]
        assert set(model.adapter.config.target_modules) == expected
        losses = steps(tc, data, 3, lr=1e-2)
        assert losses[-1] < losses[0]
    with pytest.raises(bios.InvalidArgumentError, match="select no layer"):
        client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, train_attn=False, train_mlp=False)
