"""Autoregressive sampling with a KV cache; sample requests on one base decode together as a group.

A group is formed by the scheduler from the sample requests waiting on one base model, whatever their
samplers or adapters: prompts are left-padded and prefilled together (one row per request), each
request's cache rows are repeated for its num_samples, and every decode step then runs all rows at once,
each row routed to its own adapter (train_service.lora). Each request keeps its own parameters and seeded
generator, so what it samples does not depend on its neighbours. The group takes one turn of the engine
per decode step; a finished or cancelled request leaves the group (its cache rows are dropped) and is
answered at once.
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from bios.errors import FailedPreconditionError, InvalidArgumentError
from train_service.lora import Adapter, Segment
from train_service.passes import head_logprobs


@dataclass(frozen=True)
class SamplingOptions:
    """How one request samples (the wire's SamplingParams with its defaults applied)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed

    @classmethod
    def from_pb(cls, pb: Any) -> "SamplingOptions":
        """From a bios.v1.SamplingParams message: unset optional fields take their documented defaults."""
        return cls(
            max_tokens=pb.max_tokens,
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k,
            stop_token_ids=tuple(pb.stop_token_ids),
            stop_strings=tuple(pb.stop_strings),
            seed=pb.seed if pb.HasField("seed") else None,
        )


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"  # or "stop": a stop token or string
    done: bool = False


@dataclass
class SampleRequest:
    prompt: list[int]
    params: SamplingOptions
    num_samples: int
    adapter: Adapter | None
    tokenizer: Any
    include_prompt_logprobs: bool = False
    emit: Callable[[list[tuple[int, int, float]]], object] = lambda step: None  # its value is not used
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class SampleResult:
    sequences: list[Sequence]
    prompt_logprobs: list[float]


def validate(
    prompt: list[int],
    params: SamplingOptions,
    num_samples: int,
    vocab_size: int,
    max_context: int,
    max_prompt_tokens: int,
) -> None:
    if not prompt:
        raise InvalidArgumentError("prompt: no tokens")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InvalidArgumentError(f"prompt: token id outside the vocabulary [0, {vocab_size})")
    if len(prompt) > max_prompt_tokens:
        raise InvalidArgumentError(f"prompt: {len(prompt)} tokens exceed max_pass_tokens ({max_prompt_tokens})")
    if params.max_tokens <= 0:
        raise InvalidArgumentError(f"sampling_params.max_tokens: must be > 0, got {params.max_tokens}")
    if len(prompt) + params.max_tokens > max_context:
        raise InvalidArgumentError(
            f"sampling_params.max_tokens: prompt ({len(prompt)}) + max_tokens "
            f"({params.max_tokens}) exceeds the model context ({max_context})"
        )
    if not 1 <= num_samples <= 256:
        raise InvalidArgumentError(f"num_samples: must be in 1..256, got {num_samples}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgumentError(f"sampling_params.temperature: must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise InvalidArgumentError(f"sampling_params.top_p: must be in (0, 1], got {params.top_p}")
    for t in params.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise InvalidArgumentError(f"sampling_params.stop_token_ids: {t} is outside the vocabulary")
    if any(s == "" for s in params.stop_strings):
        raise InvalidArgumentError("sampling_params.stop_strings: an empty stop string would stop at once")


def _choose(logits: torch.Tensor, params: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = params.top_p
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Inverse-CDF draw: a uniform in (0, total] against the row's cumulative sum; zero-probability tokens have
    # zero-width intervals, so they are never chosen. On CPU one row at a time: measured over a 150k vocabulary
    # (benchmarks/) ~0.25 ms a row, where torch.multinomial takes ~20 ms and a batched cumsum several ms a
    # row. On a GPU the batched form is one kernel. float32 sums move probabilities by ~1e-7 at most.
    probs = torch.softmax(logits, -1)
    uniforms = 1.0 - torch.rand(probs.shape[0], generator=generator, device=generator.device)
    if probs.device.type != "cpu":
        cdf = probs.cumsum(-1)
        picks = torch.searchsorted(cdf, (uniforms.to(probs.device) * cdf[:, -1])[:, None]).squeeze(-1)
        return picks.clamp(max=probs.shape[-1] - 1)
    row_picks = []
    for row, u in zip(probs, uniforms):
        cdf = row.cumsum(0)
        row_picks.append(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1)))
    return torch.cat(row_picks).clamp(max=probs.shape[-1] - 1)


def _ends_with_stop(tokenizer: Any, tokens: list[int], stop_strings: list[str]) -> bool:
    """Did the newest token complete a stop string? Only the tail is decoded, so the cost stays flat."""
    longest = max(len(s) for s in stop_strings)
    tail = tokenizer.decode(tokens[-(longest + 8) :])
    previous = tokenizer.decode(tokens[-(longest + 8) : -1])
    return any(s in tail and s not in previous for s in stop_strings)


class _Member:
    """One request's state inside a decode group."""

    def __init__(self, work: Any, device: torch.device):
        self.work = work
        request: SampleRequest = work.request
        self.request = request
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sequences = [Sequence() for _ in range(request.num_samples)]
        self.prompt_logprobs: list[float] = []
        self.stop_ids = set(request.params.stop_token_ids)
        self.stop_strings = list(request.params.stop_strings)
        self.produced = 0
        self.failed = False

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        if not self.work.future.done():
            self.work.future.set_exception(exc)

    def record(self, chosen: list[int], logprobs: list[float]) -> None:
        step = []
        for i, (token, logprob) in enumerate(zip(chosen, logprobs)):
            seq = self.sequences[i]
            if seq.done:
                continue
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            step.append((i, token, logprob))
            if token in self.stop_ids or (
                self.stop_strings and _ends_with_stop(self.request.tokenizer, seq.tokens, self.stop_strings)
            ):
                seq.done, seq.stop_reason = True, "stop"
        self.produced += 1
        self.request.emit(step)

    @property
    def finished(self) -> bool:
        return (
            self.failed
            or all(s.done for s in self.sequences)
            or self.produced >= self.request.params.max_tokens
            or self.request.cancelled.is_set()
        )


_group_ids = itertools.count()


class DecodeGroup:
    """Sample requests on one base decoding together; `step()` runs one decode step for all of them.

    On several ranks every rank runs every row (each layer's all-gather needs them all); rank 0 chooses the
    tokens and which requests leave, and the others take its choice (train_service.distributed)."""

    def __init__(self, base: Any, works: list[Any], gid: int | None = None):
        self.base = base
        self.gid = next(_group_ids) if gid is None else gid  # names it to the other ranks
        self.ranks = base.ranks
        self.follower = base.ranks is not None and base.ranks.rank != 0
        self.members = [_Member(w, base.device.device) for w in works]
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length) 1 = a real token; None = no padding
        self.positions: torch.Tensor | None = None  # (rows,) position of each row's last token
        self.chosen: torch.Tensor | None = None  # (rows,) the tokens chosen at the last step

    @property
    def active(self) -> bool:
        return bool(self.members)

    def _segments(self, counts: list[int]) -> list[Segment]:
        segments, row = [], 0
        for member, n in zip(self.members, counts):
            segments.append(Segment(member.request.adapter, row, row + n))
            row += n
        return segments

    def step(self) -> list[Any]:
        """One decode step (the first one prefills). Returns the works answered in this step."""
        with torch.inference_mode(), self.base.device.autocast():
            logits = self._prefill() if self.cache is None else self._decode()
            if self.follower:
                chosen, leaving = self.ranks.broadcast(None)
                self.chosen = torch.tensor(chosen, device=logits.device)
                return self._retire(leaving)
            start = 0
            chosen_rows = []
            for member in self.members:
                n = member.request.num_samples
                rows = logits[start : start + n].float()
                chosen = _choose(rows, member.request.params, member.generator)
                logprobs = torch.log_softmax(rows, -1).gather(-1, chosen[:, None]).squeeze(-1)
                values = logprobs.tolist()
                if all(math.isfinite(v) for v in values):
                    member.record(chosen.tolist(), values)
                else:  # NaN or +inf logits: there is no distribution to draw from
                    member.fail(
                        FailedPreconditionError(
                            "the model's logits are not finite (its weights were driven "
                            "to overflow?); nothing to sample from"
                        )
                    )
                chosen_rows.append(chosen)
                start += n
            self.chosen = torch.cat(chosen_rows)
            leaving = [m.finished for m in self.members]  # decided once: a cancel may land at any moment
            if self.ranks is not None:
                self.ranks.broadcast((self.chosen.tolist(), leaving))
        return self._retire(leaving)

    def _prefill(self) -> torch.Tensor:
        base, device = self.base, self.base.device.device
        prompts = [m.request.prompt for m in self.members]
        width = max(len(p) for p in prompts)
        padded = any(len(p) != width for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last token is at the end
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=base.causal_lm.config)
        segments = self._segments([1] * len(prompts))
        with base.router.route(segments):
            hidden = base.decoder(
                input_ids=ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            logits = base.head(hidden[:, -1])
        for i, member in enumerate(self.members):
            if member.request.include_prompt_logprobs and not self.follower:
                p = member.request.prompt
                h = hidden[i, width - len(p) : width - 1]
                logp = head_logprobs(base.head, h, torch.tensor(p[1:], device=device), member.request.adapter)
                member.prompt_logprobs = [float("nan")] + logp.float().cpu().tolist()
        counts = torch.tensor([m.request.num_samples for m in self.members], device=device)
        expand = torch.repeat_interleave(torch.arange(len(prompts), device=device), counts)
        self.cache.batch_select_indices(expand)
        self.mask = mask[expand] if padded else None
        self.positions = positions[:, -1][expand]
        return logits[expand]

    def _decode(self) -> torch.Tensor:
        base, chosen, positions = self.base, self.chosen, self.positions
        assert chosen is not None and positions is not None  # set by the prefill step
        self.positions = positions = positions + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        segments = self._segments([m.request.num_samples for m in self.members])
        with base.router.route(segments):
            hidden = base.decoder(
                input_ids=chosen[:, None],
                attention_mask=self.mask,
                position_ids=positions[:, None],
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            return base.head(hidden[:, -1])

    def _retire(self, leaving: list[bool]) -> list[Any]:
        """Answer the members that are done and drop their cache rows."""
        done = [m for m, gone in zip(self.members, leaving) if gone]
        if not done:
            return []
        keep: list[int] = []
        row = 0
        for member, gone in zip(self.members, leaving):
            n = member.request.num_samples
            if not gone:
                keep.extend(range(row, row + n))
            row += n
        self.members = [m for m, gone in zip(self.members, leaving) if not gone]
        if self.members:
            chosen, positions, cache = self.chosen, self.positions, self.cache
            assert chosen is not None and positions is not None and cache is not None  # set by the prefill step
            index = torch.tensor(keep, device=chosen.device)
            cache.batch_select_indices(index)
            self.chosen, self.positions = chosen[index], positions[index]
            if self.mask is not None:
                self.mask = self.mask[index]
        else:
            self.cache = None
        for member in done:
            if not member.work.future.done():
                member.work.future.set_result(SampleResult(member.sequences, member.prompt_logprobs))
        return [m.work for m in done]

    def fail(self, exc: BaseException) -> list[Any]:
        """The group's computation failed: every member answers with the error."""
        works = [m.work for m in self.members]
        for work in works:
            if not work.future.done():
                work.future.set_exception(exc)
        self.members, self.cache = [], None
        return works

    def cancel(self, key: str, exc: BaseException) -> None:
        """Members queued under `key` (a deleted model) answer with `exc` and leave at the next step."""
        for member in self.members:
            if member.work.key == key:
                member.request.cancelled.set()
                if not member.work.future.done():
                    member.work.future.set_exception(exc)
