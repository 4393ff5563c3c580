"""Loss functions over target logprobs. Each returns one loss per token; a datum's loss is their sum.

`logp` are the model's logprobs of the target tokens (the tokens of every datum of a request part,
concatenated); `inputs` are their loss_fn_inputs as tensors of the same length (logprobs `q` from the
sampler, advantages `A`, weights `w`):
    cross_entropy        -w * logp
    importance_sampling  -exp(logp - q) * A
    ppo                  -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),  r = exp(logp - q)
    cispo                -sg(clip(r)) * logp * A
    dro                  -(logp * A - beta / 2 * (logp - q) ** 2)
Every loss is a sum over tokens, so a request's loss, and its gradient, is the same split over passes
or batched with other requests.
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


LossFn = Callable[[torch.Tensor, Inputs, dict[str, float]], torch.Tensor]
# name -> (function, loss_fn_inputs it needs besides target_tokens, config keys it reads)
LOSSES: dict[str, tuple[LossFn, tuple[str, ...], tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ("weights",), ()),
    "importance_sampling": (importance_sampling, ("logprobs", "advantages"), ()),
    "ppo": (ppo, ("logprobs", "advantages"), ("clip_epsilon", "clip_epsilon_low", "clip_epsilon_high")),
    "cispo": (cispo, ("logprobs", "advantages"), ("clip_epsilon", "clip_epsilon_low", "clip_epsilon_high")),
    "dro": (dro, ("logprobs", "advantages"), ("beta",)),
}


def get_loss(name: str, config: dict[str, float]) -> tuple[LossFn, tuple[str, ...]]:
    if name not in LOSSES:
        raise InvalidArgumentError(f"loss_fn: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    fn, needed, keys = LOSSES[name]
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise InvalidArgumentError(f"loss_fn_config: {name} does not take {', '.join(unknown)}")
    return fn, needed
