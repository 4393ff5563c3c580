"""One batched pass over a shared base model: rows of several requests -> per-row logprobs and losses, and
each adapter's gradient.

A pass holds rows of several requests (parts), each part routed to its own adapter (train_service.lora).
Rows are right-padded and run without an attention mask: under a causal mask a real token never sees the
padding after it, so its result does not depend on the other rows (and SDPA can take its flash kernel).
The LM head runs on real tokens only, in chunks under activation checkpointing, so full-vocabulary logits
(0.6 GB per 1k tokens at a 151,936 vocabulary) never exist at once, in forward or in backward.

Pure torch and numpy: this module, lora.py, losses.py, device.py and models.py are the numerical core,
which benchmarks/gpu_check.py runs on a machine without gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from bios.errors import InvalidArgumentError
from train_service.lora import Adapter, LoraLinear, Segment
from train_service.losses import LossFn

LOGITS_CHUNK_BYTES = 64 * 1024 * 1024


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


def _chunk_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, adapter: Adapter | None
) -> torch.Tensor:
    logits = (
        head(hidden, [Segment(adapter, 0, hidden.shape[0])]) if isinstance(head, LoraLinear) else head(hidden)
    ).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, adapter: Adapter | None
) -> torch.Tensor:
    """(N,) logprobs of `targets` given (N, d) final hidden states, without full-vocabulary logits at once."""
    vocab = cast(torch.Tensor, head.weight).shape[0]
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


def _score(
    base: Any, part: Part, hidden: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> tuple[PartResult, torch.Tensor]:
    """One part's logprobs (LM head on its real tokens, with its adapter) and per-token losses."""
    device = hidden.device
    logp = head_logprobs(base.head, hidden[valid], targets[valid], part.adapter)
    inputs = {
        key: torch.from_numpy(np.concatenate([part.rows.inputs[i][key] for i in range(part.first, part.last)])).to(
            device
        )
        for key in part.rows.inputs[part.first]
    }
    split = lengths.tolist()
    # the datum of each token, for losses over whole sequences (gspo)
    inputs["row_index"] = torch.repeat_interleave(torch.arange(len(split)), lengths).to(device)
    per_token = part.loss(logp, inputs, part.config)
    loss = per_token.sum()
    lp = np.split(logp.detach().float().cpu().numpy(), np.cumsum(split)[:-1])
    el = np.split(per_token.detach().float().cpu().numpy(), np.cumsum(split)[:-1])
    value = float(loss.detach())
    if not math.isfinite(value):
        error = InvalidArgumentError("data: the loss is not finite for these inputs (check logprobs/advantages)")
        return PartResult(lp, el, value, error), loss
    return PartResult(lp, el, value), loss


@dataclass
class Layout:
    """The rows of a pass as padded tensors, and each part's rows."""

    input_ids: torch.Tensor  # (rows, width), right-padded
    targets: torch.Tensor
    valid: torch.Tensor  # (rows, width) bool: a real token
    lengths: torch.Tensor  # (rows,)
    segments: list[Segment]  # each part's rows, routed to its adapter


def layout(parts: list[Part], device: torch.device) -> Layout:
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
    return Layout(torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device), valid, lengths_t, segments)


def score_parts(
    base: Any, parts: list[Part], rows: Layout, hidden: torch.Tensor
) -> list[tuple[PartResult, torch.Tensor]]:
    return [
        _score(
            base,
            part,
            hidden[s.start : s.stop],
            rows.valid[s.start : s.stop],
            rows.targets[s.start : s.stop],
            rows.lengths[s.start : s.stop],
        )
        for part, s in zip(parts, rows.segments)
    ]


def run_pass(base: Any, parts: list[Part], backward: bool) -> list[PartResult]:
    """One forward (and backward) over every part's rows; each part's adapter gets only its own gradient.

    A part whose loss is not finite is left out of the backward and answers with an error."""
    rows = layout(parts, base.device.device)
    # The routing stays in place through the backward: checkpointed layers run their forward again there.
    with torch.set_grad_enabled(backward), base.training_pass(backward), base.router.route(rows.segments):
        with base.device.autocast():  # the forward only, as autocast asks
            hidden = base.decoder(input_ids=rows.input_ids, use_cache=False).last_hidden_state
            scored = score_parts(base, parts, rows, hidden)
        finite = [loss for result, loss in scored if result.error is None]
        if backward and finite and finite[0].requires_grad:
            cast(torch.Tensor, sum(finite)).backward()  # a sum of one or more tensors
    return [result for result, _ in scored]
