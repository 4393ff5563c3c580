"""Autoregressive sampling with a KV cache: all num_samples sequences decode as one batch.

`sample_steps` is a generator: the engine runs it one decode step per turn, so sampling interleaves
fairly with other sessions' work, and it reports each step's new tokens through `emit`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from bios.errors import InvalidArgumentError
from bios.v1 import train_pb2, types_pb2


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: int = train_pb2.STOP_REASON_LENGTH
    done: bool = False


def validate(prompt: list[int], params: types_pb2.SamplingParams, num_samples: int, vocab_size: int,
             max_context: int) -> None:
    if not prompt:
        raise InvalidArgumentError("prompt: no tokens")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InvalidArgumentError(f"prompt: token id outside the vocabulary [0, {vocab_size})")
    if params.max_tokens <= 0:
        raise InvalidArgumentError(f"sampling_params.max_tokens: must be > 0, got {params.max_tokens}")
    if len(prompt) + params.max_tokens > max_context:
        raise InvalidArgumentError(f"sampling_params.max_tokens: prompt ({len(prompt)}) + max_tokens "
                                   f"({params.max_tokens}) exceeds the model context ({max_context})")
    if not 1 <= num_samples <= 256:
        raise InvalidArgumentError(f"num_samples: must be in 1..256, got {num_samples}")
    temperature = params.temperature if params.HasField("temperature") else 1.0
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"sampling_params.temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidArgumentError(f"sampling_params.top_p: must be in (0, 1], got {top_p}")
    for t in params.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise InvalidArgumentError(f"sampling_params.stop_token_ids: {t} is outside the vocabulary")


def _choose(logits: torch.Tensor, params: types_pb2.SamplingParams, generator: torch.Generator) -> torch.Tensor:
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Inverse-CDF draw, one row at a time: a uniform in (0, total] against the row's cumulative sum. Zero-
    # probability tokens have zero-width intervals, so they are never chosen. Measured on CPU over a 150k
    # vocabulary (benchmarks/): ~0.25 ms a row, where torch.multinomial takes ~20 ms and a batched cumsum
    # or an exponential race several ms a row. float32 sums move probabilities by ~1e-7 at most.
    probs = torch.softmax(logits, -1)
    uniforms = 1.0 - torch.rand(probs.shape[0], generator=generator)
    picks = []
    for row, u in zip(probs, uniforms):
        cdf = row.cumsum(0)
        picks.append(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1)))
    return torch.cat(picks).clamp(max=probs.shape[-1] - 1)


def sample_steps(
    causal_lm: Any,
    tokenizer: Any,
    prompt: list[int],
    params: types_pb2.SamplingParams,
    num_samples: int,
    emit: Callable[[list[tuple[int, int, float]]], None],
    cancelled: threading.Event,
    prepare: Callable[[], None] = lambda: None,
) -> Iterator[None]:
    """Yields after each decode step; returns the finished sequences (StopIteration.value)."""
    generator = torch.Generator().manual_seed(params.seed if params.HasField("seed") else torch.seed())
    stop_ids = set(params.stop_token_ids)
    stop_strings = list(params.stop_strings)
    seqs = [Sequence() for _ in range(num_samples)]
    with torch.no_grad():
        prepare()
        out = causal_lm(input_ids=torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(num_samples)
        logits = out.logits[:, -1, :].float().expand(num_samples, -1)
        for _ in range(params.max_tokens):
            chosen = _choose(logits, params, generator)
            logprobs = torch.log_softmax(logits, -1).gather(-1, chosen[:, None]).squeeze(-1)
            step = []  # (sequence index, token, logprob) of this step, reported together
            for i, (token, logprob) in enumerate(zip(chosen.tolist(), logprobs.tolist())):
                seq = seqs[i]
                if seq.done:
                    continue
                seq.tokens.append(token)
                seq.logprobs.append(logprob)
                step.append((i, token, logprob))
                if token in stop_ids or (stop_strings and _ends_with_stop(tokenizer, seq.tokens, stop_strings)):
                    seq.done, seq.stop_reason = True, train_pb2.STOP_REASON_STOP
            emit(step)
            if all(s.done for s in seqs) or cancelled.is_set():
                break
            yield  # let other work run; the adapter is re-activated by `prepare` on resume
            prepare()
            out = causal_lm(input_ids=chosen[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
    return seqs


def _ends_with_stop(tokenizer: Any, tokens: list[int], stop_strings: list[str]) -> bool:
    """Did the newest token complete a stop string? Only the tail is decoded, so the cost stays flat."""
    longest = max(len(s) for s in stop_strings)
    tail = tokenizer.decode(tokens[-(longest + 8):])
    previous = tokenizer.decode(tokens[-(longest + 8):-1])
    return any(s in tail and s not in previous for s in stop_strings)


def prompt_logprobs(causal_lm: Any, prompt: list[int]) -> list[float]:
    """logprob of each prompt token given the ones before it; the first has no context (NaN)."""
    from train_service.compute import target_logprobs

    with torch.no_grad():
        ids = torch.tensor([prompt])
        logp = target_logprobs(causal_lm, ids[:, :-1], torch.ones_like(ids[:, :-1]), ids[:, 1:])
    return [float("nan")] + logp[0].tolist()
