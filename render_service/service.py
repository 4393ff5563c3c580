"""RenderService over gRPC: a thin translation between protobuf and the renderer library."""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import lru_cache
from typing import Any

from google.protobuf import json_format
from prometheus_client import Counter

from bios import wire
from bios.v1 import render_pb2, render_pb2_grpc
from render_service import renderers, workers
from render_service.model_registry import resolve
from render_service.renderers.base import TRAIN_ON_WHAT, BaseRenderer, RenderedTokens
from render_service.tokenizers import get_tokenizer

_TRAIN_ON_WHAT = {render_pb2.TRAIN_ON_WHAT_UNSPECIFIED: "last_assistant_message"} | {
    getattr(render_pb2, name.upper()): name for name in TRAIN_ON_WHAT
}
MAX_BYTES_PER_CONVERSATION = 4_000_000  # ~1M tokens; larger input is refused before any work is done
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


def renderer_label(spec: render_pb2.RendererSpec) -> str:
    """The metrics label of a request's renderer (its class's name), without loading its tokenizer."""
    name = spec.name or resolve(spec.tokenizer).renderer
    return "declarative" if name.startswith("declarative:") else renderers.canonical_name(name)


@lru_cache(maxsize=256)
def _renderer(name: str, tokenizer_name: str, options_json: str) -> BaseRenderer:
    import json

    if not tokenizer_name:
        raise renderers.RenderError("renderer.tokenizer: required (a model name or tokenizer directory)")
    if name.startswith("declarative:"):
        check_template_path(name.split(":", 1)[1])
    name = name or resolve(tokenizer_name).renderer
    return renderers.get_renderer(name, get_tokenizer(tokenizer_name), **json.loads(options_json))


def check_template_path(template: str) -> None:
    """Over gRPC a declarative template is a bundled name or a file under $BIOS_TEMPLATES_DIR: callers must not
    make the server open arbitrary paths."""
    import os
    from pathlib import Path

    if "/" not in template and not template.endswith((".json", ".yaml", ".yml")):
        return  # a bundled template name
    root = os.environ.get("BIOS_TEMPLATES_DIR")
    if not root or not Path(template).resolve().is_relative_to(Path(root).resolve()):
        raise renderers.RenderError(f"renderer.name: template file {template!r} is not under $BIOS_TEMPLATES_DIR")


def renderer_for(spec: render_pb2.RendererSpec) -> BaseRenderer:
    options = json_format.MessageToJson(spec.options, sort_keys=True, indent=None) if spec.HasField("options") else "{}"
    return _renderer(spec.name, spec.tokenizer, options)


def rendered_to_pb(rendered: RenderedTokens, renderer: BaseRenderer) -> render_pb2.RenderedTokens:
    count(renderer, len(rendered.token_ids))
    return wire.rendered_to_pb(rendered)


def conversation(pb: render_pb2.Conversation) -> tuple[list[dict], list[dict] | None]:
    size = pb.ByteSize()  # computed in C: reading every content field here would copy it once more
    if size > MAX_BYTES_PER_CONVERSATION:
        raise renderers.RenderError(f"messages: {size} bytes is over the limit of {MAX_BYTES_PER_CONVERSATION} "
                                    f"per conversation")
    return [wire.message_from_pb(m) for m in pb.messages], [wire.tool_from_pb(t) for t in pb.tools] or None


def train_on_what(value: int) -> str:
    if value not in _TRAIN_ON_WHAT:
        raise renderers.RenderError(f"train_on_what: unknown value {value}")
    return _TRAIN_ON_WHAT[value]


def supervised_to_pb(renderer: BaseRenderer, messages, tools, train_on: str, sft_roles,
                     into: render_pb2.SupervisedExample | None = None) -> render_pb2.SupervisedExample:
    example = renderer.supervised_example(messages, train_on, tools, sft_roles)
    pb = render_pb2.SupervisedExample() if into is None else into
    wire.rendered_to_pb(example.rendered, into=pb.tokens)
    pb.run_weights.extend(example.run_weights)
    return pb


def render_batch(request: render_pb2.RenderBatchRequest) -> render_pb2.RenderBatchResponse:
    renderer = renderer_for(request.renderer)
    train_on = train_on_what(request.train_on_what) if request.kind == render_pb2.SUPERVISED else None
    sft_roles = list(request.content_sft_roles)
    response = render_pb2.RenderBatchResponse()
    add = response.examples.add  # filled in place: a finished example given to a constructor is copied
    for i, conv in enumerate(request.conversations):
        try:
            messages, tools = conversation(conv)
            if train_on is not None:
                supervised_to_pb(renderer, messages, tools, train_on, sft_roles, into=add())
                continue
            if request.kind == render_pb2.GENERATION_PROMPT:
                rendered = renderer.render_generation_prompt(messages, None, tools)
            else:
                rendered = renderer.render(messages, tools, request.add_generation_prompt)
            wire.rendered_to_pb(rendered, into=add().tokens)
        except renderers.RenderError as exc:
            raise renderers.RenderError(f"conversations[{request.first_index + i}].{exc}") from None
    return response


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    """Rendering is CPU work: it runs in the render thread so the event loop keeps answering health checks,
    and a RenderBatch goes to the worker processes when there are some."""

    def __init__(self, render_workers: "workers.RenderWorkers | None" = None):
        self.workers = render_workers

    async def ListRenderers(self, request, context):
        return render_pb2.ListRenderersResponse(renderers=[
            render_pb2.RendererInfo(name=name, aliases=aliases, description=description)
            for name, aliases, description in renderers.list_renderers()])

    async def Render(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = renderer_for(request.renderer)
            rendered = renderer.render(messages, tools, request.add_generation_prompt)
            return rendered_to_pb(rendered, renderer)

        return await in_render_thread(run)

    async def BuildGenerationPrompt(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            prefill = request.prefill if request.HasField("prefill") else None
            renderer = renderer_for(request.renderer)
            rendered = renderer.render_generation_prompt(messages, prefill, tools)
            return rendered_to_pb(rendered, renderer)

        return await in_render_thread(run)

    async def BuildSupervisedExample(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = renderer_for(request.renderer)
            example = supervised_to_pb(renderer, messages, tools, train_on_what(request.train_on_what),
                                       list(request.content_sft_roles))
            count(renderer, len(example.tokens.token_ids))
            return example

        return await in_render_thread(run)

    async def RenderBatch(self, request, context):
        if self.workers is not None and len(request.conversations) >= 2 * workers.MIN_SLICE:
            response = await self.workers.render_batch(request)
        else:
            response = await in_render_thread(render_batch, request)
        count(renderer_label(request.renderer), sum(len(e.tokens.token_ids) for e in response.examples),
              conversations=len(response.examples))
        return response

    async def BridgeToNextTurn(self, request, context):
        from render_service.renderers.bridge import bridge_to_next_turn

        def run():
            renderer = renderer_for(request.renderer)
            new_messages, tools = conversation(request.new_turn)
            history = [wire.message_from_pb(m) for m in request.history] or None
            rendered, reason = bridge_to_next_turn(renderer, list(request.prev_prompt_ids),
                                                   list(request.prev_completion_ids), new_messages, tools,
                                                   history=history)
            response = render_pb2.BridgeToNextTurnResponse(ok=rendered is not None, reason=reason)
            if rendered is not None:
                wire.rendered_to_pb(rendered, into=response.tokens)
            return response

        return await in_render_thread(run)

    async def ConversationsToData(self, request_iterator, context):
        from render_service.datasets import data_from_lines

        settings, number = None, 0
        async for request in request_iterator:
            settings = settings or request
            train_on = train_on_what(settings.train_on_what)
            numbered = [("request", number + k + 1, line) for k, line in enumerate(request.lines)]
            number += len(request.lines)

            def run(numbered=numbered, train_on=train_on):
                renderer = renderer_for(settings.renderer)
                data = list(data_from_lines(numbered, renderer, train_on, settings.max_length or None,
                                            list(settings.content_sft_roles)))
                count(renderer, sum(datum.model_input.length + 1 for datum in data), conversations=len(data))
                return render_pb2.DataBatch(data=[wire.datum_to_pb(d) for d in data])

            yield await in_render_thread(run)

    async def ParseResponse(self, request, context):
        def run():  # in the render thread, like every renderer construction (see _RENDER_THREAD)
            renderer = renderer_for(request.renderer)
            tools = [wire.tool_from_pb(t) for t in request.tools] or None
            message, ok = renderer.parse_response(list(request.tokens), tools)
            response = render_pb2.ParseResponseResponse(ok=ok)
            wire.message_to_pb(message, into=response.message)
            return response

        return await in_render_thread(run)

    async def GetStopSequences(self, request, context):
        def run():
            renderer = renderer_for(request.renderer)
            return render_pb2.StopSequences(token_ids=renderer.get_stop_sequences(),
                                            strings=renderer.get_stop_strings())

        return await in_render_thread(run)


def add_to_server(server: Any, render_workers: "workers.RenderWorkers | None" = None) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(render_workers), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]

