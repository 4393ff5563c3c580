"""Loss functions over target logprobs. Each returns one loss per token; a datum's loss is their sum.

`logp` are the model's logprobs of the target tokens (the tokens of every datum of a request part,
concatenated); `inputs` are their loss_fn_inputs as tensors of the same length (logprobs `q` from the
sampler, advantages `A`, weights `w`):
    cross_entropy        -w * logp
    importance_sampling  -exp(logp - q) * A
    ppo                  -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),  r = exp(logp - q)
    cispo                -sg(clip(r)) * logp * A
    dro                  -(logp * A - beta / 2 * (logp - q) ** 2)
    gspo                 ppo with every token's ratio the value of its sequence's ratio s (with the token's own
                         gradient), s = exp(mean of logp - q over the tokens sequence_ratio_mask marks)
Every loss is a sum over tokens, so a request's loss, and its gradient, is the same split over passes
or batched with other requests. A loss over whole sequences (gspo) groups tokens by `inputs["row_index"]`,
the datum each token belongs to; a datum is never split between passes.
"""

from __future__ import annotations

from typing import Callable

import torch

from bios.errors import InvalidArgumentError

Inputs = dict[str, torch.Tensor]


def cross_entropy(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    return -(inputs["weights"] * logp)


def _ratio(logp: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return torch.exp(logp - inputs["logprobs"])


def _clipped(ratio: torch.Tensor, config: dict[str, float]) -> torch.Tensor:
    low = config.get("clip_epsilon_low", config.get("clip_epsilon", 0.2))
    high = config.get("clip_epsilon_high", config.get("clip_epsilon", 0.2))
    return ratio.clamp(1.0 - low, 1.0 + high)


def importance_sampling(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    return -(_ratio(logp, inputs) * inputs["advantages"])


def ppo(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    ratio, adv = _ratio(logp, inputs), inputs["advantages"]
    return -torch.minimum(ratio * adv, _clipped(ratio, config) * adv)


def cispo(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    weight = _clipped(_ratio(logp, inputs), config).detach()
    return -(weight * logp * inputs["advantages"])


def dro(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    beta = config.get("beta", 0.05)
    return -(logp * inputs["advantages"] - 0.5 * beta * (logp - inputs["logprobs"]) ** 2)


def gspo(logp: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> torch.Tensor:
    """GSPO-token (Zheng et al., 2025), as Tinker defines it: a sequence-level ratio, per-token gradients."""
    row, marked = inputs["row_index"], (inputs["sequence_ratio_mask"] != 0).to(logp.dtype)
    rows = int(row.max()) + 1 if row.numel() else 0
    log_ratio = (logp.detach() - inputs["logprobs"]) * marked
    sums = torch.zeros(rows, dtype=logp.dtype, device=logp.device).index_add_(0, row, log_ratio)
    counts = torch.zeros(rows, dtype=logp.dtype, device=logp.device).index_add_(0, row, marked)
    sequence = sums / counts.clamp(min=1)  # a sequence with no marked token has ratio 1
    ratio, adv = torch.exp(sequence[row] + logp - logp.detach()), inputs["advantages"]
    return -torch.minimum(ratio * adv, _clipped(ratio, config) * adv)


LossFn = Callable[[torch.Tensor, Inputs, dict[str, float]], torch.Tensor]
# name -> (function, loss_fn_inputs it needs besides target_tokens, config keys it reads)
LOSSES: dict[str, tuple[LossFn, tuple[str, ...], tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ("weights",), ()),
    "importance_sampling": (importance_sampling, ("logprobs", "advantages"), ()),
    "ppo": (ppo, ("logprobs", "advantages"), ("clip_epsilon", "clip_epsilon_low", "clip_epsilon_high")),
    "cispo": (cispo, ("logprobs", "advantages"), ("clip_epsilon", "clip_epsilon_low", "clip_epsilon_high")),
    "dro": (dro, ("logprobs", "advantages"), ("beta",)),
    "gspo": (
        gspo,
        ("logprobs", "advantages", "sequence_ratio_mask"),
        ("clip_epsilon", "clip_epsilon_low", "clip_epsilon_high"),
    ),
}


def get_loss(name: str, config: dict[str, float]) -> tuple[LossFn, tuple[str, ...]]:
    if name not in LOSSES:
        raise InvalidArgumentError(f"loss_fn: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    fn, needed, keys = LOSSES[name]
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise InvalidArgumentError(f"loss_fn_config: {name} does not take {', '.join(unknown)}")
    return fn, needed
