"""forward_backward with a loss written in torch on the client (seed 001: "or a custom callable").

The server returns logprobs; the client computes loss(data, logprobs) and its gradient g with respect to
each logprob, then sends a cross-entropy step with weights -g: d/dθ of -sum(-g * logp) = sum(g * dlogp/dθ),
exactly the custom loss's gradient. Needs torch on the client.
"""

from __future__ import annotations

from typing import Any, Callable

from bios import types
from bios.futures import APIFuture


def run_custom_loss(client: Any, data: list[types.Datum], loss_fn: Callable) -> APIFuture[types.ForwardBackwardOutput]:
    import torch  # noqa: F401, PLC0415 - the light client has no torch: fail here, before any call

    probe = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                **d.loss_fn_inputs,
                "weights": types.TensorData.coerce([0.0] * len(d.loss_fn_inputs["target_tokens"].data)),
            },
        )
        for d in data
    ]
    # Blocks until the logprobs are back, so operations submitted after this call stay after it.
    forward = client.forward(probe, "cross_entropy").result()
    logprobs = [out["logprobs"].to_torch().float().requires_grad_(True) for out in forward.loss_fn_outputs]
    loss, metrics = loss_fn(data, logprobs)
    loss.backward()
    surrogate = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": (-lp.grad).tolist()},
        )
        for d, lp in zip(data, logprobs)
    ]
    value, extra = float(loss.detach()), dict(metrics or {})

    def with_custom_metrics(out: types.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
        # The surrogate's loss:mean means nothing here (its weights are gradients): the custom loss is its own.
        server = {k: v for k, v in out.metrics.items() if k != "loss:mean"}
        return types.ForwardBackwardOutput(
            loss_fn_outputs=out.loss_fn_outputs, metrics={**server, **extra, "loss:sum": value}
        )

    return client.forward_backward(surrogate, "cross_entropy").then(with_custom_metrics)
