"""Every loss, computed by the service's chunked path, against a plain full-logits reference: values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bios import types, wire
from bios.v1 import types_pb2
from render_service.model_registry import resolve
from train_service import data as request_data
from train_service import passes
from train_service.losses import get_loss
from train_service.models import BaseModelPool
from train_service.scheduler import Limits


@pytest.fixture(scope="module")
def base():
    return BaseModelPool().get(resolve("ultrasafe/usf-mini"))


@pytest.fixture(scope="module")
def adapter(base):
    adapter = base.new_adapter("ref", base.peft_config(types.LoraConfig(rank=4, seed=3)), seed=3)
    # Move the adapter away from its zero init so gradients flow through A and B.
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return adapter


@pytest.fixture(scope="module")
def peft_reference(adapter, tmp_path_factory):
    """The same adapter loaded by peft into a fresh copy of the base: an independent implementation of LoRA."""
    from peft import PeftModel

    from train_service.checkpoints import write_adapter
    from train_service.tiny_model import build_tiny_qwen3

    directory = tmp_path_factory.mktemp("ref-adapter")
    write_adapter(directory, adapter.config, adapter.state_dict())
    return PeftModel.from_pretrained(build_tiny_qwen3(), str(directory), is_trainable=True).eval()


def run(base, adapter, data, loss_fn, config, backward=False):
    """One pass of the service's chunked path over `data`, all rows on `adapter`."""
    fn, needed = get_loss(loss_fn, config)
    rows = request_data.decode_data(data, base.vocab_size, needed, base.max_context, Limits())
    return passes.run_pass(base, [passes.Part(adapter, rows, 0, len(rows), fn, config)], backward)[0]


def make_batch(base, rng, lengths=(9, 14)):
    data = []
    for n in lengths:
        ids = rng.integers(0, base.vocab_size, n + 1)
        inputs = {
            "target_tokens": ids[1:],
            "weights": rng.random(n).astype(np.float32),
            "logprobs": -rng.random(n).astype(np.float32) * 3,
            "advantages": rng.normal(size=n).astype(np.float32),
            "sequence_ratio_mask": (np.arange(n) >= n // 3).astype(np.float32),
        }
        data.append(
            wire.datum_to_pb(
                types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()), loss_fn_inputs=inputs)
            )
        )
    return data


def reference(model, data, loss_fn, config):
    """peft's LoRA, full logits, a plain log_softmax, each formula written out per token."""
    total = torch.zeros(())
    for pb in data:
        ids = torch.tensor([list(pb.model_input.chunks[0].encoded_text.tokens)])
        inputs = {
            k: torch.from_numpy(wire.tensor_to_array(v).astype(np.float64)).float()
            for k, v in pb.loss_fn_inputs.items()
        }
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, -1).gather(-1, inputs["target_tokens"].long()[:, None])[:, 0]
        q, adv, w = inputs["logprobs"], inputs["advantages"], inputs["weights"]
        ratio = torch.exp(logp - q)
        if loss_fn == "gspo":  # one ratio per sequence: its value on every token, each token's own gradient
            marked = inputs["sequence_ratio_mask"] != 0
            ratio = torch.exp((logp.detach() - q)[marked].mean() + logp - logp.detach())
        eps_low = config.get("clip_epsilon_low", config.get("clip_epsilon", 0.2))
        eps_high = config.get("clip_epsilon_high", config.get("clip_epsilon", 0.2))
        for t in range(len(logp)):
            if loss_fn == "cross_entropy":
                term = -w[t] * logp[t]
            elif loss_fn == "importance_sampling":
                term = -ratio[t] * adv[t]
            elif loss_fn in ("ppo", "gspo"):
                term = -torch.minimum(ratio[t] * adv[t], ratio[t].clamp(1 - eps_low, 1 + eps_high) * adv[t])
            elif loss_fn == "cispo":
                term = -ratio[t].clamp(1 - eps_low, 1 + eps_high).detach() * logp[t] * adv[t]
            else:  # dro
                term = -(logp[t] * adv[t] - 0.5 * config.get("beta", 0.05) * (logp[t] - q[t]) ** 2)
            total = total + term
    return total


@pytest.mark.parametrize(
    "loss_fn,config",
    [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", {}),
        ("ppo", {"clip_epsilon_low": 0.1, "clip_epsilon_high": 0.3}),
        ("cispo", {}),
        ("dro", {"beta": 0.2}),
        ("gspo", {}),
        ("gspo", {"clip_epsilon_low": 0.01, "clip_epsilon_high": 0.02}),
    ],
)
def test_loss_matches_reference(base, adapter, peft_reference, loss_fn, config, monkeypatch):
    monkeypatch.setattr(passes, "LOGITS_CHUNK_BYTES", 4 * base.vocab_size * 5)  # 5-token chunks: exercise chunking
    rng = np.random.default_rng(0)
    data = make_batch(base, rng)
    params = adapter.parameters()

    for p in params:
        p.grad = None
    result = run(base, adapter, data, loss_fn, config, backward=True)
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    peft_params = dict(peft_reference.named_parameters())
    peft_reference.zero_grad(set_to_none=True)
    expected = reference(peft_reference, data, loss_fn, config)
    expected.backward()
    # our adapter's tensors in PEFT key order: ...<module>.lora_A.weight -> ...<module>.lora_A.default.weight
    theirs = [peft_params[k.replace(".weight", ".default.weight")].grad.clone() for k in adapter.state_dict()]

    assert result.loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        # float32 sums in a different order (batched, chunked): tolerance relative to the gradient scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def test_padding_does_not_leak_between_data(base, adapter):
    """A datum's logprobs are the same alone and in a batch with a longer one."""
    rng = np.random.default_rng(5)
    data = make_batch(base, rng, lengths=(6, 30))
    both = run(base, adapter, data, "cross_entropy", {})
    alone = run(base, adapter, data[:1], "cross_entropy", {})
    np.testing.assert_allclose(both.logprobs[0], alone.logprobs[0], rtol=1e-5, atol=1e-5)


def test_bad_loss_config_is_refused(base, adapter):
    from bios.errors import InvalidArgumentError

    data = make_batch(base, np.random.default_rng(1))
    with pytest.raises(InvalidArgumentError, match="loss_fn_config: ppo does not take gamma"):
        run(base, adapter, data, "ppo", {"gamma": 1.0})
    with pytest.raises(InvalidArgumentError, match=r"data\[0\].loss_fn_inputs: missing 'advantages'"):
        pb = types_pb2.Datum()
        pb.CopyFrom(data[0])
        del pb.loss_fn_inputs["advantages"]
        request_data.decode_data([pb], base.vocab_size, ("logprobs", "advantages"), base.max_context, Limits())
