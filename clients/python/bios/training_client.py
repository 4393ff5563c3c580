"""TrainingClient: one LoRA model on the train service; operations are ordered and pipelined."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any, Callable, Sequence

from bios import compose, types, wire
from bios.custom_loss import run_custom_loss
from bios.futures import APIFuture
from bios.operations import OperationStream
from bios.sampling_client import SamplingClient
from bios.v1 import train_pb2


def _fb_input(data: Sequence[types.Datum], loss_fn: str, loss_fn_config: dict | None):
    return train_pb2.ForwardBackwardInput(
        data=[wire.datum_to_pb(d) for d in data], loss_fn=loss_fn, loss_fn_config=loss_fn_config or {}
    )


def loss_weight(data: Sequence[types.Datum]) -> float:
    """The total loss weight of the data: Σ weights (the trained tokens, for 0/1 weights); 0 without weights."""
    return float(sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in data if "weights" in d.loss_fn_inputs))


def _output(event: Any, weight: float) -> types.ForwardBackwardOutput:
    """The server's metrics (loss:sum, tokens:sum, ...) plus loss:mean = loss:sum / Σ weights, the loss per
    trained token, which unlike the sum does not grow with the batch."""
    output = wire.forward_backward_from_pb(event.forward_backward)
    if weight > 0 and "loss:sum" in output.metrics:
        output.metrics["loss:mean"] = output.metrics["loss:sum"] / weight
    return output


class TrainingClient:
    def __init__(self, service: Any, info: types.ModelInfo):
        self._service = service
        self.model_id = info.model_id
        self.base_model = info.base_model
        self._info = info
        self._ops = OperationStream(
            service._loop, service._train, info.model_id, service._metadata, track=service._track
        )
        service._streams.add(self._ops)
        self._tokenizer = None

    # ---- ordered operations -----------------------------------------------------------------------

    def forward(
        self, data: Sequence[types.Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        future = self._ops.submit(forward=_fb_input(data, loss_fn, loss_fn_config))
        weight = loss_weight(data)
        return APIFuture(future, lambda e: _output(e, weight))

    def forward_backward(
        self, data: Sequence[types.Datum], loss_fn: str | Callable = "cross_entropy", loss_fn_config: dict | None = None
    ) -> APIFuture[types.ForwardBackwardOutput]:
        if callable(loss_fn):
            return self.forward_backward_custom(data, loss_fn)
        future = self._ops.submit(forward_backward=_fb_input(data, loss_fn, loss_fn_config))
        weight = loss_weight(data)
        return APIFuture(future, lambda e: _output(e, weight))

    def forward_backward_custom(
        self, data: Sequence[types.Datum], loss_fn: Callable
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """A loss computed here in torch on the model's logprobs; the server applies its gradient.

        `loss_fn(data, logprobs_list) -> (loss, metrics)`. The gradient g = dloss/dlogprobs is sent back
        as a weighted cross-entropy (weights = -g), whose gradient with respect to the model equals it.
        """
        return run_custom_loss(self, list(data), loss_fn)

    def optim_step(self, adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        params = adam_params or types.AdamParams()
        future = self._ops.submit(optim_step=train_pb2.OptimStepRequest(adam_params=wire.adam_params_to_pb(params)))
        return APIFuture(future, lambda e: wire.optim_step_response_from_pb(e.optim_step))

    def train(
        self,
        data: Sequence[types.Datum],
        loss_fn: str | Callable = "cross_entropy",
        learning_rate: float = 1e-4,
        **kwargs: Any,
    ) -> types.TrainingResult:
        """One training step (forward_backward + optim_step), waited for: seed 001's train() -> TrainingResult.

        kwargs: weight_decay, grad_clip (or grad_clip_norm), beta1, beta2, eps, loss_fn_config."""
        return self.train_future(data, loss_fn, learning_rate, **kwargs).result()

    def train_future(
        self,
        data: Sequence[types.Datum],
        loss_fn: str | Callable = "cross_entropy",
        learning_rate: float = 1e-4,
        **kwargs: Any,
    ) -> APIFuture[types.TrainingResult]:
        """The same step, submitted without waiting."""
        if "grad_clip" in kwargs:
            kwargs["grad_clip_norm"] = kwargs.pop("grad_clip")
        loss_fn_config = kwargs.pop("loss_fn_config", None)
        adam = types.AdamParams(learning_rate=learning_rate, **kwargs)
        fb = self.forward_backward(data, loss_fn, loss_fn_config)
        opt = self.optim_step(adam)
        both: concurrent.futures.Future = concurrent.futures.Future()

        def finish(_: Any) -> None:
            if both.done():
                return
            try:
                fb_out, opt_out = fb.result(), opt.result()
            except BaseException as exc:  # noqa: BLE001
                both.set_exception(exc)
                return
            both.set_result(
                types.TrainingResult(
                    loss=fb_out.metrics.get("loss:sum", 0.0),
                    metrics={**fb_out.metrics, **opt_out.metrics},
                    step=opt_out.step,
                )
            )

        opt._future.add_done_callback(finish)
        return APIFuture(both)

    def save_state(self, name: str, metadata: dict | None = None) -> APIFuture[types.Checkpoint]:
        request = train_pb2.SaveStateRequest(name=name, metadata_json=json.dumps(metadata or {}))
        return APIFuture(self._ops.submit(save_state=request), lambda e: wire.checkpoint_from_pb(e.checkpoint))

    def load_state(self, path: str) -> APIFuture[types.LoadStateResponse]:
        request = train_pb2.LoadStateRequest(path=path, load_optimizer=False)
        return APIFuture(
            self._ops.submit(load_state=request), lambda e: types.LoadStateResponse(step=e.load_state.step)
        )

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadStateResponse]:
        request = train_pb2.LoadStateRequest(path=path, load_optimizer=True)
        return APIFuture(
            self._ops.submit(load_state=request), lambda e: types.LoadStateResponse(step=e.load_state.step)
        )

    def save_weights_for_sampler(self, name: str) -> APIFuture[types.Checkpoint]:
        request = train_pb2.SaveWeightsForSamplerRequest(name=name)
        return APIFuture(
            self._ops.submit(save_weights_for_sampler=request), lambda e: wire.checkpoint_from_pb(e.checkpoint)
        )

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClient:
        checkpoint = self.save_weights_for_sampler(name).result()
        return self._service.create_sampling_client(model_path=checkpoint.path)

    # ---- sampling from the current weights ---------------------------------------------------------

    def sample(
        self, prompt: types.ModelInput, sampling_params: types.SamplingParams, num_samples: int = 1
    ) -> APIFuture[types.SampleResponse]:
        """Samples with the weights as of every operation submitted before this call."""
        concurrent.futures.wait(self._ops.pending())
        sampler = SamplingClient(self._service, model_id=self.model_id, base_model=self.base_model)
        return sampler.sample(prompt, sampling_params, num_samples)

    # ---- the two services together ------------------------------------------------------------------

    def train_on_conversations(
        self,
        conversations: Sequence[Sequence[dict]],
        renderer: Any = None,
        epochs: int = 1,
        batch_size: int = 8,
        learning_rate: float = 1e-4,
        **kwargs: Any,
    ) -> list[types.TrainingResult]:
        """Render (through the render service unless a renderer object is given) and train; see bios.compose."""
        return compose.train_on_conversations(
            self, conversations, renderer, epochs, batch_size, learning_rate, **kwargs
        )

    def chat(
        self,
        messages: list[dict],
        renderer: Any = None,
        sampling_params: types.SamplingParams | None = None,
        tools: list[dict] | None = None,
    ):
        """Render + sample with the current weights + parse; returns a ChatResult with the prompt attribution."""
        return compose.chat(self, messages, renderer, sampling_params, tools)

    # ---- info ----------------------------------------------------------------------------------

    def get_info(self) -> types.ModelInfo:
        return self._service._get_info(self.model_id)

    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._service.get_tokenizer(self._info.tokenizer)
        return self._tokenizer

    def close(self) -> None:
        self._ops.close()

    def delete(self, timeout: float = 60.0) -> None:
        """Free this model on the train service (adapter, gradient, optimizer state); its checkpoints stay.
        Operations still queued for it fail with NOT_FOUND; this returns once each has its answer."""
        self._service._unary("DeleteModel", train_pb2.DeleteModelRequest(model_id=self.model_id))
        concurrent.futures.wait(self._ops.pending(), timeout)
        self._ops.close()

    # ---- async variants: return once submitted, with a future to await ----------------------------

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.Checkpoint]:
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.LoadStateResponse]:
        return self.load_state(*args, **kwargs)

    async def save_weights_for_sampler_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.Checkpoint]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def sample_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.SampleResponse]:
        return await asyncio.to_thread(self.sample, *args, **kwargs)

    async def train_async(self, *args: Any, **kwargs: Any) -> types.TrainingResult:
        """Resolves straight to the TrainingResult (seed 001 awaits it once)."""
        return await self.train_future(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(self, name: str) -> SamplingClient:
        checkpoint = await self.save_weights_for_sampler(name)
        return self._service.create_sampling_client(model_path=checkpoint.path)
