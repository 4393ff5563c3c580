"""The embedded tiny Qwen3 stand-in: deterministic, small, and able to learn under LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from train_service.tiny_model import TINY_QWEN3_SEED, build_tiny_qwen3, tiny_qwen3_config

IM_END = 151645
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Qwen3 token ids of
# "<|im_start|>system\nProvide medical information accurately.<|im_end|>\n"
# "<|im_start|>user\nWhat causes Type 2 diabetes?<|im_end|>\n"
# "<|im_start|>assistant\nType 2 diabetes is caused by insulin resistance.<|im_end|>\n"
PROMPT = [151644, 8948, 198, 60424, 6457, 1995, 29257, 13, 151645, 198,
          151644, 872, 198, 3838, 11137, 3990, 220, 17, 19754, 30, 151645, 198,
          151644, 77091, 198]  # fmt: skip
ANSWER = [929, 220, 17, 19754, 374, 8881, 553, 31052, 13643, 13, IM_END]
CHATML = (PROMPT, ANSWER, [198])


def random_conversation(seed: int, length: int = 50, answer_len: int = 11):
    """A fixed pseudo-random token list whose last turn ends like a ChatML answer."""
    ids = torch.randint(0, 151643, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids[length - 2], ids[length - 1] = IM_END, 198
    start = length - 1 - answer_len
    return ids[:start], ids[start : length - 1], ids[length - 1 :]


def test_same_seed_gives_identical_weights_without_touching_global_rng():
    before = torch.get_rng_state()
    a, b = build_tiny_qwen3(), build_tiny_qwen3(TINY_QWEN3_SEED)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Weights come from the seed, not from whatever the global RNG happens to be.
    torch.manual_seed(12345)
    c = build_tiny_qwen3()
    assert all(torch.equal(sa[k], v) for k, v in c.state_dict().items())
    d = build_tiny_qwen3(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, d.model.embed_tokens.weight)
    # Other dtypes are the rounding of the same fp32 weights.
    half = build_tiny_qwen3(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.model.layers[1].mlp.down_proj.weight, a.model.layers[1].mlp.down_proj.weight.bfloat16())


def test_config_and_size():
    config = tiny_qwen3_config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (151936, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (IM_END, 151643, None)
    assert config.max_position_embeddings == 4096
    assert tiny_qwen3_config(vocab_size=1000).vocab_size == 1000

    model = build_tiny_qwen3()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    n_params = sum(p.numel() for p in model.parameters())
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 16 + 2 * 64
    assert n_params == 151936 * 64 + 2 * per_layer + 64 == 9_798_016
    megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert 5 < megabytes < 60
    # Large enough init that the logits are not flat (see the module docstring).
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    assert torch.isfinite(logits).all() and logits.std() > 1.0


def lora_wrap(model):
    # peft draws lora_A from the global RNG: pin it, and keep it from leaking.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))


def greedy(model, prompt, max_new_tokens):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=IM_END,
            pad_token_id=151643,
        )
    return out[0, len(prompt) :].tolist()


def test_fresh_lora_leaves_logits_unchanged():
    model = build_tiny_qwen3()
    x = torch.tensor([PROMPT + ANSWER])
    with torch.no_grad():
        base = model(x).logits
        wrapped = lora_wrap(model)
        assert torch.equal(wrapped(x).logits, base)  # lora_B starts at zero


@pytest.mark.parametrize(("seed", "conversation"), [(0, CHATML), (1, random_conversation(7))], ids=["chatml", "random"])
def test_lora_sft_learns_one_conversation(seed, conversation):
    prompt, answer, tail = conversation
    ids = prompt + answer + tail
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    weights = torch.zeros(len(ids) - 1)
    weights[len(prompt) - 1 : len(prompt) - 1 + len(answer)] = 1.0  # positions that predict the answer

    model = lora_wrap(build_tiny_qwen3(seed))
    assert greedy(model, prompt, len(answer)) != answer  # not already known
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )

    def loss_fn():
        return (F.cross_entropy(model(x).logits[0].float(), y, reduction="none") * weights).sum()

    model.train()
    losses = []
    for _ in range(40):
        loss = loss_fn()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = loss_fn().item()

    assert final * 5 <= losses[0], f"loss {losses[0]:.2f} -> {final:.4f} after 40 steps"
    assert greedy(model, prompt, len(answer) + 2) == answer
