"""The numerical core: validated rows -> one batched pass over a shared base -> per-row logprobs and losses,
and the AdamW step.

A pass holds rows of several requests (parts), each part routed to its own adapter. Rows are right-
padded and run without an attention mask: under a causal mask a real token never sees the padding
after it, so its result does not depend on the other rows (and SDPA can take its flash kernel). The
LM head runs on real tokens only, in chunks under activation checkpointing, so full-vocabulary logits
(0.6 GB per 1k tokens at a 151,936 vocabulary) never exist at once, in forward or in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from bios import wire
from bios.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from bios.v1 import types_pb2
from train_service.lora import Adapter, LoraLinear, Segment
from train_service.losses import LossFn

LOGITS_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Engine limits, reported in GetInfo. A request above them is refused; a pass never exceeds them."""

    max_request_tokens: int = 131_072  # tokens in one forward / forward_backward request
    max_pass_tokens: int = 16_384  # padded tokens (rows x longest row) in one pass over the base
    max_pass_ops: int = 64  # requests coalesced into one pass; 1 = no coalescing


@dataclass
class Rows:
    """One request's data, validated: one row per datum (numpy, int64 ids, float32 loss inputs)."""

    ids: list[np.ndarray]
    targets: list[np.ndarray]
    inputs: list[dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(i) for i in self.ids)


def _integer_ids(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise InvalidArgumentError(f"{field}: token ids must be integers")
    elif array.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{field}: token ids must be integers, got {array.dtype}")
    return array.astype(np.int64)


def decode_data(data: list[types_pb2.Datum], vocab_size: int, needed: tuple[str, ...], max_context: int,
                limits: Limits) -> Rows:
    """Validate a request's data; every error names the datum and the field, or the limit."""
    if not data:
        raise InvalidArgumentError("data: empty batch")
    longest = min(max_context, limits.max_pass_tokens)
    ids_list, targets_list, inputs_list, total = [], [], [], 0
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        ids: list[int] = []
        for chunk in datum.model_input.chunks:
            if not chunk.HasField("encoded_text"):
                raise InvalidArgumentError(f"{where}.model_input: image chunks are not supported by this model")
            ids += chunk.encoded_text.tokens
        n = len(ids)
        if n == 0:
            raise InvalidArgumentError(f"{where}.model_input: no tokens")
        if n > max_context:
            raise InvalidArgumentError(f"{where}.model_input: {n} tokens exceed the model context ({max_context})")
        if n > longest:
            raise ResourceExhaustedError(f"{where}.model_input: {n} tokens exceed max_pass_tokens ({longest})")
        total += n
        if total > limits.max_request_tokens:
            raise ResourceExhaustedError(f"data: more than max_request_tokens ({limits.max_request_tokens}) tokens "
                                         "in one request; split it into several requests")
        array = np.asarray(ids, dtype=np.int64)
        if array.min() < 0 or array.max() >= vocab_size:
            bad = int(array.max() if array.max() >= vocab_size else array.min())
            raise InvalidArgumentError(f"{where}.model_input: token id {bad} is outside the vocabulary [0, {vocab_size})")
        fields = {}
        for key in ("target_tokens", *needed):
            if key not in datum.loss_fn_inputs:
                raise InvalidArgumentError(f"{where}.loss_fn_inputs: missing {key!r}")
            name = f"{where}.loss_fn_inputs[{key!r}]"
            value = wire.tensor_to_array(datum.loss_fn_inputs[key], name).reshape(-1)
            if len(value) != n:
                raise InvalidArgumentError(f"{name}: length {len(value)} differs from model_input length {n}")
            if key != "target_tokens" and not np.isfinite(value).all():
                raise InvalidArgumentError(f"{name}: contains NaN or infinity")
            fields[key] = value
        targets = _integer_ids(fields.pop("target_tokens"), f"{where}.loss_fn_inputs['target_tokens']")
        if targets.min() < 0 or targets.max() >= vocab_size:
            raise InvalidArgumentError(f"{where}.loss_fn_inputs['target_tokens']: token id outside the vocabulary "
                                       f"[0, {vocab_size})")
        ids_list.append(array)
        targets_list.append(targets)
        inputs_list.append({k: v.astype(np.float32) for k, v in fields.items()})
    return Rows(ids_list, targets_list, inputs_list)


# ---- the pass ------------------------------------------------------------------------------------

@dataclass
class Part:
    """Rows [first, last) of one request, computed with `adapter` and scored with `loss`."""

    adapter: Adapter
    rows: Rows
    first: int
    last: int
    loss: LossFn
    config: dict[str, float]


@dataclass
class PartResult:
    logprobs: list[np.ndarray]  # per row
    losses: list[np.ndarray]  # per-token loss, per row
    loss: float  # summed over the part's tokens
    error: Exception | None = None  # this part failed (non-finite loss); the others are unaffected


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    adapter: Adapter | None) -> torch.Tensor:
    logits = (head(hidden, [Segment(adapter, 0, hidden.shape[0])]) if isinstance(head, LoraLinear)
              else head(hidden)).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  adapter: Adapter | None) -> torch.Tensor:
    """(N,) logprobs of `targets` given (N, d) final hidden states, without full-vocabulary logits at once."""
    vocab = head.weight.shape[0]
    chunk = max(16, LOGITS_CHUNK_BYTES // (4 * vocab))
    pieces = []
    for start in range(0, targets.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            # Recompute this chunk's logits in backward instead of keeping them alive.
            pieces.append(checkpoint(_chunk_logprobs, head, h, t, adapter, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h, t, adapter))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def run_pass(base: Any, parts: list[Part], backward: bool) -> list[PartResult]:
    """One forward (and backward) over every part's rows; each part's adapter gets only its own gradient.

    A part whose loss is not finite is left out of the backward and answers with an error."""
    device = base.device.device
    lengths = [len(part.rows.ids[i]) for part in parts for i in range(part.first, part.last)]
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    targets = np.zeros((len(lengths), width), np.int64)
    segments, row = [], 0
    for part in parts:
        start = row
        for i in range(part.first, part.last):
            n = len(part.rows.ids[i])
            ids[row, :n], targets[row, :n] = part.rows.ids[i], part.rows.targets[i]
            row += 1
        segments.append(Segment(part.adapter, start, row))
    lengths_t = torch.tensor(lengths)
    valid = (torch.arange(width)[None, :] < lengths_t[:, None]).to(device)
    input_ids, target_ids = torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)

    results: list[PartResult] = []
    total = None
    with torch.set_grad_enabled(backward), base.training_pass(backward), base.device.autocast():
        with base.router.route(segments):
            hidden = base.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        for part, segment in zip(parts, segments):
            rows = slice(segment.start, segment.stop)
            mask = valid[rows]
            logp = head_logprobs(base.head, hidden[rows][mask], target_ids[rows][mask], part.adapter)
            inputs = {key: torch.from_numpy(np.concatenate([part.rows.inputs[i][key]
                                                            for i in range(part.first, part.last)])).to(device)
                      for key in part.rows.inputs[part.first]}
            per_token = part.loss(logp, inputs, part.config)
            loss = per_token.sum()
            split = lengths_t[rows].tolist()
            lp = np.split(logp.detach().float().cpu().numpy(), np.cumsum(split)[:-1])
            el = np.split(per_token.detach().float().cpu().numpy(), np.cumsum(split)[:-1])
            value = float(loss.detach())
            if not math.isfinite(value):
                error = InvalidArgumentError("data: the loss is not finite for these inputs (check logprobs/advantages)")
                results.append(PartResult(lp, el, value, error))
                continue
            results.append(PartResult(lp, el, value))
            total = loss if total is None else total + loss
        if backward and total is not None and total.requires_grad:
            total.backward()
    return results


def prompt_logprobs(base: Any, prompts: list[list[int]], adapters: list[Adapter | None]) -> list[list[float]]:
    """logprob of each prompt token given the ones before it (the first has no context: NaN), per prompt."""
    out = []
    for prompt, adapter in zip(prompts, adapters):
        if len(prompt) < 2:
            out.append([float("nan")] * len(prompt))
            continue
        ids = torch.tensor([prompt[:-1]], device=base.device.device)
        with torch.inference_mode(), base.device.autocast():
            with base.router.route([Segment(adapter, 0, 1)]):
                hidden = base.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
            logp = head_logprobs(base.head, hidden, torch.tensor(prompt[1:], device=ids.device), adapter)
        out.append([float("nan")] + logp.float().cpu().tolist())
    return out


# ---- the optimizer step ----------------------------------------------------------------------------

def validate_adam(adam: types_pb2.AdamParams) -> None:
    values = {"learning_rate": adam.learning_rate, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps,
              "weight_decay": adam.weight_decay, "grad_clip_norm": adam.grad_clip_norm}
    for key, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"adam_params.{key}: must be a finite number >= 0, got {value}")
    for key in ("beta1", "beta2"):
        if not values[key] < 1:
            raise InvalidArgumentError(f"adam_params.{key}: must be in [0, 1), got {values[key]}")
    if not adam.eps > 0:
        # Adam divides by sqrt(v) + eps; v is exactly 0 wherever a gradient is (LoRA B starts at zero).
        raise InvalidArgumentError(f"adam_params.eps: must be > 0, got {adam.eps}")


def new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, fused=fused or None)


@torch.no_grad()
def _all_finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    # Per element, not through a norm: a norm of finite values above ~1e19 overflows float32.
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def adam_step(optimizer: torch.optim.AdamW, params: list[torch.nn.Parameter], adam: types_pb2.AdamParams) -> dict:
    """One AdamW step with the request's hyper-parameters. A step that would make any weight non-finite is
    refused with the weights and optimizer state left as they were; the gradient is consumed either way."""
    validate_adam(adam)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise FailedPreconditionError("optim_step: no gradient since the last step (call forward_backward first)")
    try:
        norms = torch.stack(torch._foreach_norm(grads))
        grad_norm = float(torch.linalg.vector_norm(norms))
        if not math.isfinite(grad_norm):
            raise InvalidArgumentError("optim_step: the gradient norm is not finite; step refused, weights unchanged")
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
        for group in optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                       for p in params if p in optimizer.state}
        try:
            optimizer.step()
            finite = _all_finite([p.detach() for p in params])
        except RuntimeError:  # e.g. "value cannot be converted to type float without overflow", mid-update
            finite = False
        if not finite:
            with torch.no_grad():
                for p, old in zip(params, saved_params):
                    p.copy_(old)
            optimizer.state.clear()
            optimizer.state.update(saved_state)
            raise InvalidArgumentError("adam_params: this step would make weights non-finite (learning_rate too "
                                       "large?); step refused, weights unchanged")
    finally:
        optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "learning_rate": adam.learning_rate}
