"""SamplingClient: sample from a base model or saved sampler weights; tokens stream as they are made."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc

from bios import compose, types, wire
from bios.errors import from_status
from bios.futures import APIFuture
from bios.v1 import train_pb2


class SamplingClient:
    def __init__(
        self,
        service: Any,
        sampler_id: str | None = None,
        model_id: str | None = None,
        base_model: str = "",
        model_path: str = "",
        tokenizer: str = "",
        renderer: str = "",
    ):
        self._service = service
        self._target = {"sampler_id": sampler_id} if sampler_id else {"model_id": model_id}
        self.sampler_id = sampler_id
        self.base_model = base_model
        self.model_path = model_path
        self.tokenizer_name = tokenizer or base_model
        self.renderer_name = renderer

    def chat(
        self,
        messages: list[dict],
        renderer: Any = None,
        sampling_params: types.SamplingParams | None = None,
        tools: list[dict] | None = None,
    ) -> compose.ChatResult:
        """Render the prompt, sample, parse the reply: see bios.compose.chat."""
        return compose.chat(self, messages, renderer, sampling_params, tools)

    def get_tokenizer(self) -> Any:
        return self._service.get_tokenizer(self.tokenizer_name)

    def _request(
        self,
        prompt: types.ModelInput,
        sampling_params: types.SamplingParams,
        num_samples: int,
        include_prompt_logprobs: bool,
    ) -> train_pb2.SampleRequest:
        if isinstance(prompt, list):
            prompt = types.ModelInput.from_ints(prompt)
        return train_pb2.SampleRequest(
            **self._target,
            prompt=wire.model_input_to_pb(prompt),
            sampling_params=wire.sampling_params_to_pb(sampling_params),
            num_samples=num_samples,
            include_prompt_logprobs=include_prompt_logprobs,
        )

    async def _collect(self, request: train_pb2.SampleRequest) -> types.SampleResponse:
        async for event in self.stream_events(request):
            if event.WhichOneof("event") == "result":
                return wire.sample_response_from_pb(event.result)
        raise from_status(grpc.StatusCode.INTERNAL, "sample stream ended without a result")

    async def stream_events(self, request: train_pb2.SampleRequest) -> AsyncIterator[train_pb2.SampleEvent]:
        call = self._service._train.Sample(request, metadata=self._service._metadata, timeout=self._service.timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise from_status(err.code(), err.details() or "") from None

    async def sample_stream(
        self, prompt: types.ModelInput, sampling_params: types.SamplingParams, num_samples: int = 1
    ) -> AsyncIterator[tuple[int, list[int]] | types.SampleResponse]:
        """Tokens as they are produced: yields (sequence_index, new_tokens) pairs, then the SampleResponse.

        Iterate it with `async for` on your own event loop; the gRPC stream is driven by the client's loop."""
        request = self._request(prompt, sampling_params, num_samples, False)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def pump() -> None:
            try:
                async for event in self.stream_events(request):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        self._service._loop.submit(pump())
        while (event := await queue.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            if event.WhichOneof("event") == "deltas":
                for delta in event.deltas.deltas:
                    yield delta.sequence_index, list(delta.tokens)
            else:
                yield wire.sample_response_from_pb(event.result)

    def sample(
        self,
        prompt: types.ModelInput,
        sampling_params: types.SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
    ) -> APIFuture[types.SampleResponse]:
        request = self._request(prompt, sampling_params, num_samples, include_prompt_logprobs)
        return APIFuture(self._service._track(self._service._loop.submit(self._collect(request))))

    async def sample_async(
        self,
        prompt: types.ModelInput,
        sampling_params: types.SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
    ) -> APIFuture[types.SampleResponse]:
        return self.sample(prompt, sampling_params, num_samples, include_prompt_logprobs)

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        """logprob of every prompt token given the tokens before it (None for the first)."""
        future = self.sample(prompt, types.SamplingParams(max_tokens=1, temperature=0.0), include_prompt_logprobs=True)
        return future.then(lambda response: response.prompt_logprobs or [])

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        return self.compute_logprobs(prompt)
