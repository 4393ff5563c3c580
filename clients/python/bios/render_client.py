"""RenderClient: the renderer API of bios_cookbook.renderers, served by the render service."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
from collections import deque
from collections.abc import Mapping
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import grpc
from google.protobuf import struct_pb2

from bios import types, wire
from bios.errors import InvalidArgumentError, from_status
from bios.rendered import RenderedTokens
from bios.v1 import render_pb2

BATCH_CHUNK = 64  # conversations per RenderBatch request
BATCH_IN_FLIGHT = 3  # requests outstanding at once
_TRAIN_ON_WHAT: dict[str, render_pb2.TrainOnWhat] = {
    name.lower(): value for name, value in render_pb2.TrainOnWhat.items() if value
}


def datum_from_pb(pb) -> types.Datum:
    return types.Datum(
        model_input=wire.model_input_from_pb(pb.model_input),
        loss_fn_inputs={k: wire.tensor_data_from_pb(v) for k, v in pb.loss_fn_inputs.items()},
    )


class RenderClient:
    def __init__(self, service: Any, renderer: str, tokenizer: str, **options: Any):
        self._service = service
        spec_options = struct_pb2.Struct()
        spec_options.update(options)
        self.spec = render_pb2.RendererSpec(name=renderer, tokenizer=tokenizer, options=spec_options)

    def _call(self, method: str, request: Any) -> Any:
        return self._service._render_call(method, request)

    def list_renderers(self) -> list[render_pb2.RendererInfo]:
        return list(self._call("ListRenderers", render_pb2.ListRenderersRequest()).renderers)

    def render(self, messages: Sequence[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False):
        request = render_pb2.RenderRequest(renderer=self.spec, add_generation_prompt=add_generation_prompt)
        wire.conversation_to_pb(messages, tools, into=request.conversation)
        return wire.rendered_from_pb(self._call("Render", request))

    def build_generation_prompt(
        self, messages: Sequence[dict], prefill: str | None = None, tools: list[dict] | None = None
    ) -> types.ModelInput:
        request = render_pb2.BuildGenerationPromptRequest(renderer=self.spec)
        wire.conversation_to_pb(messages, tools, into=request.conversation)
        if prefill is not None:
            request.prefill = prefill
        return types.ModelInput.from_ints(self._call("BuildGenerationPrompt", request).token_ids)

    def build_supervised_example(
        self,
        messages: Sequence[dict],
        train_on_what: str = "last_assistant_message",
        tools: list[dict] | None = None,
        content_sft_roles: Iterable[str] = (),
    ):
        request = render_pb2.BuildSupervisedExampleRequest(
            renderer=self.spec,
            train_on_what=self._train_on_what(train_on_what),
            content_sft_roles=list(content_sft_roles),
        )
        wire.conversation_to_pb(messages, tools, into=request.conversation)
        example = self._call("BuildSupervisedExample", request)
        return wire.supervised_from_pb(example)

    def build_supervised_examples(
        self, conversations: Sequence[Sequence[dict] | Mapping[str, Any]], train_on_what: str = "last_assistant_message"
    ) -> list[tuple[types.Tokens, list[float]]]:
        """Many conversations through the batched RPC: chunks of BATCH_CHUNK, up to BATCH_IN_FLIGHT at once, so
        that building requests and reading replies here overlaps the rendering on the server.

        A conversation is a list of messages, or a chat JSONL record `{"messages": [...], "tools": [...]}`."""
        train_on = self._train_on_what(train_on_what)
        pending: deque[concurrent.futures.Future] = deque()
        out: list[tuple[types.Tokens, list[float]]] = []
        try:
            for first in range(0, len(conversations), BATCH_CHUNK):
                request = render_pb2.RenderBatchRequest(
                    renderer=self.spec, kind=render_pb2.SUPERVISED, train_on_what=train_on, first_index=first
                )
                add = request.conversations.add  # filled in place: nested constructors would copy each one
                for k, conversation in enumerate(conversations[first : first + BATCH_CHUNK], first):
                    try:
                        if isinstance(conversation, Mapping):
                            if "messages" not in conversation:
                                raise InvalidArgumentError("messages: missing (a record needs 'messages')")
                            wire.conversation_to_pb(conversation["messages"], conversation.get("tools"), into=add())
                        else:
                            wire.conversation_to_pb(conversation, into=add())
                    except InvalidArgumentError as exc:
                        raise InvalidArgumentError(f"conversations[{k}].{exc}") from None
                pending.append(self._service._render_submit("RenderBatch", request))
                if len(pending) >= BATCH_IN_FLIGHT:
                    out += map(wire.supervised_from_pb, pending.popleft().result().examples)
            while pending:
                out += map(wire.supervised_from_pb, pending.popleft().result().examples)
        finally:
            for future in pending:  # after an error: the chunks still in flight are not wanted
                future.cancel()
        return out

    def bridge_to_next_turn(
        self,
        prev_prompt_ids: Sequence[int],
        prev_completion_ids: Sequence[int],
        new_messages: Sequence[dict],
        tools: list[dict] | None = None,
        history: Sequence[dict] | None = None,
    ) -> tuple[RenderedTokens | None, str]:
        """Earlier tokens kept verbatim + the next turn, exactly; or (None, why not)."""
        if hasattr(prev_prompt_ids, "to_ints"):
            prev_prompt_ids = prev_prompt_ids.to_ints()
        request = render_pb2.BridgeToNextTurnRequest(
            renderer=self.spec,
            prev_prompt_ids=list(prev_prompt_ids),
            prev_completion_ids=list(prev_completion_ids),
            new_turn=wire.conversation_to_pb(new_messages, tools),
            history=[wire.message_to_pb(m) for m in history or []],
        )
        response = self._call("BridgeToNextTurn", request)
        return (wire.rendered_from_pb(response.tokens) if response.ok else None), response.reason

    def conversations_to_data(
        self,
        path: str,
        train_on_what: str = "last_assistant_message",
        max_length: int | None = None,
        lines_per_request: int = 256,
    ) -> Iterator[types.Datum]:
        """Stream a chat JSONL file through the render service: Datums come back as the file is read."""
        results: queue.Queue = queue.Queue(maxsize=8)  # bounded: the file is read no faster than it is used
        done = object()

        async def requests():
            first = True
            with open(path, encoding="utf-8") as f:
                while lines := list(islice(f, lines_per_request)):
                    yield render_pb2.ConversationsToDataRequest(
                        renderer=self.spec if first else None,
                        lines=lines,
                        max_length=max_length or 0,
                        train_on_what=self._train_on_what(train_on_what) if first else 0,
                    )
                    first = False

        async def run():
            try:
                call = self._service._render.ConversationsToData(requests(), metadata=self._service._metadata)
                async for batch in call:
                    for datum in batch.data:
                        await asyncio.to_thread(results.put, datum_from_pb(datum))
                await asyncio.to_thread(results.put, done)
            except grpc.aio.AioRpcError as err:
                await asyncio.to_thread(results.put, from_status(err.code(), err.details() or ""))

        self._service._loop.submit(run())
        while (item := results.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[dict, bool]:
        request = render_pb2.ParseResponseRequest(
            renderer=self.spec, tokens=list(tokens), tools=[wire.tool_to_pb(t) for t in tools or []]
        )
        response = self._call("ParseResponse", request)
        return wire.message_from_pb(response.message), response.ok

    def get_stop_sequences(self) -> list[int]:
        return list(self._call("GetStopSequences", render_pb2.GetStopSequencesRequest(renderer=self.spec)).token_ids)

    def get_stop_strings(self) -> list[str]:
        return list(self._call("GetStopSequences", render_pb2.GetStopSequencesRequest(renderer=self.spec)).strings)

    @staticmethod
    def _train_on_what(name: str) -> render_pb2.TrainOnWhat:
        if name not in _TRAIN_ON_WHAT:
            raise InvalidArgumentError(
                f"train_on_what: unknown value {name!r}; expected one of {', '.join(_TRAIN_ON_WHAT)}"
            )
        return _TRAIN_ON_WHAT[name]
