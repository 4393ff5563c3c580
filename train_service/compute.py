"""The numerical core: batches of Datum -> target logprobs -> loss -> gradients -> AdamW step.

The LM head is applied in chunks of tokens under activation checkpointing, so full-vocabulary logits
(0.6 GB per 1k tokens at a 151,936 vocabulary) never exist at once, in forward or in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from bios import wire
from bios.errors import InvalidArgumentError
from bios.v1 import types_pb2
from train_service.losses import get_loss

LOGITS_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    inputs: list[dict[str, torch.Tensor]]  # per datum, each (n_i,)
    lengths: list[int]


def decode_batch(data: list[types_pb2.Datum], vocab_size: int, needed: tuple[str, ...]) -> Batch:
    """Validate and pad the data; every error names the datum and the field."""
    if not data:
        raise InvalidArgumentError("data: empty batch")
    rows, inputs = [], []
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        ids = []
        for chunk in datum.model_input.chunks:
            if not chunk.HasField("encoded_text"):
                raise InvalidArgumentError(f"{where}.model_input: image chunks are not supported by this model")
            ids += chunk.encoded_text.tokens
        n = len(ids)
        if n == 0:
            raise InvalidArgumentError(f"{where}.model_input: no tokens")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise InvalidArgumentError(f"{where}.model_input: token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                                       f"is outside the vocabulary [0, {vocab_size})")
        fields = {}
        for key in ("target_tokens", *needed):
            if key not in datum.loss_fn_inputs:
                raise InvalidArgumentError(f"{where}.loss_fn_inputs: missing {key!r}")
            array = wire.tensor_to_array(datum.loss_fn_inputs[key], f"{where}.loss_fn_inputs[{key!r}]").reshape(-1)
            if len(array) != n:
                raise InvalidArgumentError(f"{where}.loss_fn_inputs[{key!r}]: length {len(array)} differs from "
                                           f"model_input length {n}")
            if key != "target_tokens" and not np.isfinite(array).all():
                raise InvalidArgumentError(f"{where}.loss_fn_inputs[{key!r}]: contains NaN or infinity")
            fields[key] = array
        targets = fields.pop("target_tokens")
        if targets.min() < 0 or targets.max() >= vocab_size:
            raise InvalidArgumentError(f"{where}.loss_fn_inputs['target_tokens']: token id outside the vocabulary "
                                       f"[0, {vocab_size})")
        rows.append((ids, targets.astype(np.int64)))
        inputs.append({k: torch.from_numpy(v.astype(np.float32)) for k, v in fields.items()})
    lengths = [len(ids) for ids, _ in rows]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (ids, tgt) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.from_numpy(ids)
        targets[b, : len(ids)] = torch.from_numpy(tgt)
        mask[b, : len(ids)] = 1
    return Batch(input_ids, mask, targets, inputs, lengths)


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def target_logprobs(causal_lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """(B, T) logprobs of `targets` under the model, computed without full-vocabulary logits."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    head = causal_lm.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = max(16, LOGITS_CHUNK_BYTES // (4 * head.weight.shape[0]))
    pieces = []
    for start in range(0, flat_targets.shape[0], chunk):
        h, t = flat_hidden[start : start + chunk], flat_targets[start : start + chunk]
        if torch.is_grad_enabled():
            # Recompute this chunk's logits in backward instead of keeping them alive.
            pieces.append(checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h, t))
    return torch.cat(pieces).view(targets.shape)


@dataclass
class ForwardResult:
    logprobs: list[np.ndarray]  # per datum
    losses: list[np.ndarray]  # per-token loss contributions, per datum (for cross_entropy)
    loss: float


def forward_backward(causal_lm: torch.nn.Module, batch: Batch, loss_fn: str, config: dict[str, float],
                     backward: bool) -> ForwardResult:
    fn, _ = get_loss(loss_fn, config)
    with torch.set_grad_enabled(backward):
        logp = target_logprobs(causal_lm, batch.input_ids, batch.attention_mask, batch.targets)
        total = torch.zeros((), dtype=torch.float32)
        per_datum = []
        for b, n in enumerate(batch.lengths):
            row = logp[b, :n]
            loss = fn(row, batch.inputs[b], config)
            total = total + loss
            per_datum.append(row)
        if not torch.isfinite(total):
            raise InvalidArgumentError("data: the loss is not finite for these inputs (check logprobs/advantages)")
        if backward:
            total.backward()
    elementwise = [(-(batch.inputs[b]["weights"] * r.detach())).numpy() if "weights" in batch.inputs[b]
                   else np.zeros(len(r), np.float32) for b, r in enumerate(per_datum)]
    return ForwardResult([r.detach().numpy().astype(np.float32) for r in per_datum], elementwise, total.detach().item())


def adam_step(optimizer: torch.optim.AdamW, params: list[torch.nn.Parameter], adam: types_pb2.AdamParams) -> dict:
    """One AdamW step with the request's hyper-parameters; returns metrics."""
    values = {"learning_rate": adam.learning_rate, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps,
              "weight_decay": adam.weight_decay, "grad_clip_norm": adam.grad_clip_norm}
    for key, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"adam_params.{key}: must be a finite number >= 0, got {value}")
    if not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1):
        raise InvalidArgumentError("adam_params.beta1/beta2: must be in [0, 1)")
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    if adam.grad_clip_norm > 0 and grads:
        torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
    for group in optimizer.param_groups:
        group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                     weight_decay=adam.weight_decay)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "learning_rate": adam.learning_rate}
