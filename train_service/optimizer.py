"""The AdamW step of one training model, with every hyper-parameter validated and a non-finite step refused.

A step that would make any weight non-finite leaves the weights and optimizer state as they were (they are
copied before the step: LoRA weights are small next to the base).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bios.errors import FailedPreconditionError, InvalidArgumentError


def validate_adam(adam: Any) -> None:
    values = {
        "learning_rate": adam.learning_rate,
        "beta1": adam.beta1,
        "beta2": adam.beta2,
        "eps": adam.eps,
        "weight_decay": adam.weight_decay,
        "grad_clip_norm": adam.grad_clip_norm,
    }
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


def adam_step(optimizer: torch.optim.AdamW, params: list[torch.nn.Parameter], adam: Any) -> dict:
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
            group.update(
                lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
            )
        saved_params = [p.detach().clone() for p in params]
        saved_state: dict[torch.Tensor, dict[Any, Any]] = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for p in params
            if p in optimizer.state
        }
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
            raise InvalidArgumentError(
                "adam_params: this step would make weights non-finite (learning_rate too "
                "large?); step refused, weights unchanged"
            )
    finally:
        optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "learning_rate": adam.learning_rate}
