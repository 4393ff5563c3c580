"""RenderService over gRPC: a thin translation between protobuf and the renderer library (batch.py holds the
protobuf-to-protobuf part, which the worker processes run too)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import lru_cache
from typing import Any

from prometheus_client import Counter

from bios import wire
from bios.errors import ResourceExhaustedError
from bios.v1 import render_pb2, render_pb2_grpc
from render_service import renderers, workers
from render_service.batch import (
    MAX_BYTES_PER_CONVERSATION,
    check_batch,
    conversation,
    messages_from_pb,
    render_batch,
    renderer_for,
    sft_roles,
    supervised_to_pb,
    tools_from_pb,
    train_on_what,
)
from render_service.datasets import data_from_lines
from render_service.model_registry import resolve
from render_service.renderers.base import BaseRenderer, RenderedTokens, validate_messages
from render_service.renderers.bridge import bridge_to_next_turn

MAX_TOKEN_IDS = 1_000_000  # token ids in one ParseResponse / BridgeToNextTurn field
CONVERSATIONS = Counter("bios_render_conversations", "Conversations rendered, by renderer.", ["renderer"])
TOKENS = Counter("bios_render_tokens", "Tokens produced by rendering, by renderer.", ["renderer"])


# One render thread per process: the GIL serializes rendering anyway, and fastokens costs more from many
# threads (measured here: tens of ms of set-up in each new thread, and three threads encoding at once ~3x
# slower per text than one). Requests wait their turn; more cores mean more --workers or pods.
_RENDER_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="render")


async def in_render_thread(fn, *args):
    """Run fn(*args) in the render thread: off the event loop, which keeps answering health checks."""
    return await asyncio.get_running_loop().run_in_executor(_RENDER_THREAD, fn, *args)


def count(renderer: BaseRenderer | str, n_tokens: int, conversations: int = 1) -> None:
    label = renderer if isinstance(renderer, str) else renderer.name
    CONVERSATIONS.labels(label).inc(conversations)
    TOKENS.labels(label).inc(n_tokens)


def renderer_label(spec: render_pb2.RendererSpec, allow_local_paths: bool) -> str:
    """The metrics label of a request's renderer (its class's name), without loading its tokenizer."""
    name = spec.name or resolve(spec.tokenizer, allow_local_paths, "renderer.tokenizer").renderer
    return "declarative" if name.startswith("declarative:") else renderers.canonical_name(name)


def rendered_to_pb(rendered: RenderedTokens, renderer: BaseRenderer) -> render_pb2.RenderedTokens:
    count(renderer, len(rendered.token_ids))
    return wire.rendered_to_pb(rendered)


@lru_cache(maxsize=256)
def _token_limit(tokenizer_name: str, allow_local_paths: bool, tokenizer_size: int) -> int:
    return resolve(tokenizer_name, allow_local_paths, "renderer.tokenizer").token_limit(tokenizer_size)


def token_ids(
    ids: Any, renderer: BaseRenderer, spec: render_pb2.RendererSpec, allow_local_paths: bool, field: str
) -> list[int]:
    """Token ids a caller sent back, each checked against the model's vocabulary (a bad id would crash or vanish
    in decode; ids past the tokenizer's but within the model's embedding are legal, and decode to nothing)."""
    if len(ids) > MAX_TOKEN_IDS:
        raise ResourceExhaustedError(f"{field}: {len(ids)} token ids is over the limit of {MAX_TOKEN_IDS}")
    ids = list(ids)
    vocab = _token_limit(spec.tokenizer, allow_local_paths, len(renderer.tokenizer))
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        k = next(k for k, t in enumerate(ids) if not 0 <= t < vocab)
        raise renderers.RenderError(f"{field}[{k}]: token id {ids[k]} is outside the vocabulary [0, {vocab})")
    return ids


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    """Rendering is CPU work: it runs in the render thread so the event loop keeps answering health checks,
    and a RenderBatch goes to the worker processes when there are some.

    `allow_local_paths`: may callers name tokenizers by server directory and send their own templates?"""

    def __init__(self, render_workers: "workers.RenderWorkers | None" = None, allow_local_paths: bool = False):
        self.workers = render_workers
        self.allow_local_paths = allow_local_paths

    def _renderer(self, spec: render_pb2.RendererSpec) -> BaseRenderer:
        return renderer_for(spec, self.allow_local_paths)

    async def ListRenderers(self, request, context):
        return render_pb2.ListRenderersResponse(
            renderers=[
                render_pb2.RendererInfo(name=name, aliases=aliases, description=description)
                for name, aliases, description in renderers.list_renderers()
            ]
        )

    async def Render(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = self._renderer(request.renderer)
            rendered = renderer.render(messages, tools, request.add_generation_prompt)
            return rendered_to_pb(rendered, renderer)

        return await in_render_thread(run)

    async def BuildGenerationPrompt(self, request, context):
        def run():
            prefill = request.prefill if request.HasField("prefill") else None
            messages, tools = conversation(request.conversation, extra_bytes=len((prefill or "").encode()))
            renderer = self._renderer(request.renderer)
            rendered = renderer.render_generation_prompt(messages, prefill, tools)
            return rendered_to_pb(rendered, renderer)

        if request.HasField("prefill") and len(request.prefill) > MAX_BYTES_PER_CONVERSATION:
            raise ResourceExhaustedError(
                f"prefill: {len(request.prefill)} characters is over the limit of "
                f"{MAX_BYTES_PER_CONVERSATION} bytes per conversation"
            )
        return await in_render_thread(run)

    async def BuildSupervisedExample(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = self._renderer(request.renderer)
            example = supervised_to_pb(
                renderer, messages, tools, train_on_what(request.train_on_what), sft_roles(request.content_sft_roles)
            )
            count(renderer, len(example.tokens.token_ids))
            return example

        return await in_render_thread(run)

    async def RenderBatch(self, request, context):
        check_batch(request)
        if self.workers is not None and len(request.conversations) >= 2 * workers.MIN_SLICE:
            response = await self.workers.render_batch(request, self.allow_local_paths)
        else:
            response = await in_render_thread(render_batch, request, self.allow_local_paths)
        count(
            renderer_label(request.renderer, self.allow_local_paths),
            sum(len(e.tokens.token_ids) for e in response.examples),
            conversations=len(response.examples),
        )
        return response

    async def BridgeToNextTurn(self, request, context):
        def run():
            renderer = self._renderer(request.renderer)
            new_messages, tools = conversation(request.new_turn, "new_turn.")
            history = messages_from_pb(request.history, "history") or None
            # Checked here: inside the bridge a bad message only makes the re-render fail, answered ok=false.
            validate_messages(new_messages, "new_turn.messages", ordering=False)  # tool results answer the turn
            if history:
                validate_messages(history, "history")
            prompt = token_ids(
                request.prev_prompt_ids, renderer, request.renderer, self.allow_local_paths, "prev_prompt_ids"
            )
            completion = token_ids(
                request.prev_completion_ids, renderer, request.renderer, self.allow_local_paths, "prev_completion_ids"
            )
            rendered, reason = bridge_to_next_turn(renderer, prompt, completion, new_messages, tools, history=history)
            response = render_pb2.BridgeToNextTurnResponse(ok=rendered is not None, reason=reason)
            if rendered is not None:
                wire.rendered_to_pb(rendered, into=response.tokens)
            return response

        return await in_render_thread(run)

    async def ConversationsToData(self, request_iterator, context):
        settings, number = None, 0
        async for request in request_iterator:
            if settings is None:  # the first request's settings hold for the whole stream
                settings = request
                train_on = train_on_what(settings.train_on_what)
                roles = sft_roles(settings.content_sft_roles)
                if settings.max_length < 0:
                    raise renderers.RenderError(
                        f"max_length: must be >= 0 (0 = no truncation), got {settings.max_length}"
                    )
            numbered = []
            for line in request.lines:
                number += 1
                if len(line) > MAX_BYTES_PER_CONVERSATION:
                    raise ResourceExhaustedError(
                        f"request, line {number}: {len(line)} characters is over the "
                        f"limit of {MAX_BYTES_PER_CONVERSATION} bytes per conversation"
                    )
                numbered.append(("request", number, line))

            def run(numbered=numbered, settings=settings, train_on=train_on, roles=roles):
                renderer = self._renderer(settings.renderer)
                data = list(data_from_lines(numbered, renderer, train_on, settings.max_length or None, roles))
                count(renderer, sum(datum.model_input.length + 1 for datum in data), conversations=len(data))
                return render_pb2.DataBatch(data=[wire.datum_to_pb(d) for d in data])

            yield await in_render_thread(run)

    async def ParseResponse(self, request, context):
        def run():  # in the render thread, like every renderer construction (see _RENDER_THREAD)
            renderer = self._renderer(request.renderer)
            tools = tools_from_pb(request.tools, "tools") or None
            tokens = token_ids(request.tokens, renderer, request.renderer, self.allow_local_paths, "tokens")
            message, ok = renderer.parse_response(tokens, tools)
            response = render_pb2.ParseResponseResponse(ok=ok)
            wire.message_to_pb(message, into=response.message)
            return response

        return await in_render_thread(run)

    async def GetStopSequences(self, request, context):
        def run():
            renderer = self._renderer(request.renderer)
            return render_pb2.StopSequences(
                token_ids=renderer.get_stop_sequences(), strings=renderer.get_stop_strings()
            )

        return await in_render_thread(run)


def add_to_server(
    server: Any, render_workers: "workers.RenderWorkers | None" = None, allow_local_paths: bool = False
) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(render_workers, allow_local_paths), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]
