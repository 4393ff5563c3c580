"""Tiny Qwen3-architecture causal LM used as the embedded development stand-in.

The real service fine-tunes Qwen3 checkpoints; tests and local development run
without a model hub or GPU, so they use this few-tens-of-MB model instead. It
keeps the real Qwen3 vocabulary (151936) and special-token ids so it pairs with
the real Qwen3 tokenizer and ChatML rendering, and its random weights come from
a fixed seed so every build is bit-identical.

The init scale is chosen so that LoRA alone can make the model learn visibly.
LoRA never touches the embedding / tied LM head or the norms, so they bound
how sharp the output distribution can ever become. The final hidden state has
RMS 1 (norm weight 1), so |h| = sqrt(d); with embedding std s the target's
logit is at most d*s while the other logits are ~N(0, d*s^2), whose
log-partition is ~ln(V) + d*s^2/2. The reachable margin d*s - d*s^2/2 - ln(V)
is largest at s = 1 (~20 nats for d = 64), whereas the HF default s = 0.02
leaves the target unable to rise ~1 nat above the rest. The price is a peaky
random model (initial loss ~45 nats/token instead of ln(V) ~ 12). Linear
layers use std 1/sqrt(fan_in) so activations keep unit scale through the
residual stream; norms start at 1.
"""

from __future__ import annotations

import math

import torch
import transformers

TINY_QWEN3_SEED = 0

# Real Qwen3 special tokens: <|im_end|> ends every ChatML turn (and is the
# generation EOS); <|endoftext|> is used for padding; Qwen3 has no BOS.
QWEN3_VOCAB_SIZE = 151936
QWEN3_IM_END_ID = 151645
QWEN3_PAD_ID = 151643

EMBEDDING_STD = 1.0


def tiny_qwen3_config(vocab_size: int = QWEN3_VOCAB_SIZE) -> transformers.Qwen3Config:
    """Config of the tiny stand-in (2 layers, hidden 64, GQA 4/2 heads)."""
    # HF configs take extra kwargs such as attn_implementation (strict(accept_kwargs=True)); the dataclass
    # signature that type checkers see does not list them
    return transformers.Qwen3Config(  # type: ignore[call-arg]  # see above
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # keep GQA so k/v shapes differ from q, as in real Qwen3
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,  # tied head: the vocab matrix is stored once (~39 MB fp32)
        attention_bias=False,
        use_sliding_window=False,
        initializer_range=EMBEDDING_STD,  # documents the embedding scale; we init ourselves
        bos_token_id=None,
        eos_token_id=QWEN3_IM_END_ID,
        pad_token_id=QWEN3_PAD_ID,
        # SDPA: bit-reproducible on CPU (forward and backward) and several times
        # faster than eager once sequences reach hundreds of tokens.
        attn_implementation="sdpa",
        use_cache=True,
    )


@torch.no_grad()
def _init_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    # Walk parameters in their (stable) registration order so the stream of
    # random numbers, and hence every weight, depends only on the seed.
    for name, param in model.named_parameters():  # tied lm_head is yielded once
        if param.ndim == 1:  # RMSNorm weights (no biases in Qwen3)
            param.fill_(1.0)
            continue
        if name.endswith("embed_tokens.weight"):
            std = EMBEDDING_STD
        else:  # nn.Linear weight (out, in): keep activation variance ~1
            std = 1.0 / math.sqrt(param.shape[1])
        fresh = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.copy_(fresh.mul_(std))


def build_tiny_qwen3(seed: int = TINY_QWEN3_SEED, dtype: torch.dtype = torch.float32) -> transformers.Qwen3ForCausalLM:
    """Build the tiny Qwen3 with deterministic random weights for ``seed``."""
    config = tiny_qwen3_config()
    # Construction runs the HF initialiser on the global RNG; fork it so that
    # building a model never perturbs the caller's random stream. Those values
    # are overwritten below anyway.
    with torch.random.fork_rng(devices=[]):
        model = transformers.Qwen3ForCausalLM(config)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("tiny Qwen3 expects a tied LM head")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    _init_parameters(model, generator)
    model.generation_config.eos_token_id = QWEN3_IM_END_ID
    model.generation_config.pad_token_id = QWEN3_PAD_ID
    model.generation_config.bos_token_id = None
    # Cast after init so every dtype is the rounding of the same fp32 weights.
    return model.to(dtype=dtype).eval()  # type: ignore[call-arg]  # typeshed: a @wraps method does not bind self


# A Llama-3-architecture twin for models named with a Llama 3 tokenizer (vocab 128256), e.g. in tests of
# seed 004, which trains "meta-llama/Llama-3.1-8B-Instruct": same shape and init as the Qwen3 stand-in.
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_ID, LLAMA3_EOT_ID = 128000, 128009


def build_tiny_llama3(seed: int = TINY_QWEN3_SEED, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(  # type: ignore[call-arg]  # attn_implementation, as in tiny_qwen3_config
        vocab_size=LLAMA3_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=LLAMA3_BOS_ID,
        eos_token_id=LLAMA3_EOT_ID,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlamaForCausalLM(config)
    _init_parameters(model, torch.Generator(device="cpu").manual_seed(seed))
    return model.to(dtype=dtype).eval()  # type: ignore[call-arg]  # typeshed: a @wraps method does not bind self


TINY_BUILDERS = {"tiny:qwen3": build_tiny_qwen3, "tiny:llama3": build_tiny_llama3}
