"""RenderService over gRPC: a thin translation between protobuf and the renderer library."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

from google.protobuf import json_format
from prometheus_client import Counter

from bios import wire
from bios.v1 import render_pb2, render_pb2_grpc
from render_service import renderers
from render_service.model_registry import resolve
from render_service.renderers.base import TRAIN_ON_WHAT, BaseRenderer, RenderedTokens
from render_service.tokenizers import get_tokenizer

_TRAIN_ON_WHAT = {render_pb2.TRAIN_ON_WHAT_UNSPECIFIED: "last_assistant_message"} | {
    getattr(render_pb2, name.upper()): name for name in TRAIN_ON_WHAT
}
MAX_CHARS_PER_CONVERSATION = 4_000_000  # ~1M tokens; larger input is refused before any work is done
CONVERSATIONS = Counter("bios_render_conversations", "Conversations rendered, by renderer.", ["renderer"])
TOKENS = Counter("bios_render_tokens", "Tokens produced by rendering, by renderer.", ["renderer"])


def count(renderer: BaseRenderer, n_tokens: int) -> None:
    CONVERSATIONS.labels(renderer.name).inc()
    TOKENS.labels(renderer.name).inc(n_tokens)


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


def rendered_to_pb(rendered: RenderedTokens, messages: list[dict],
                   renderer: BaseRenderer) -> render_pb2.RenderedTokens:
    count(renderer, len(rendered.token_ids))
    roles = [m["role"] for m in messages]
    roles += ["assistant"] * (max(rendered.message_indices, default=-1) + 1 - len(roles))  # a prefill
    return render_pb2.RenderedTokens(token_ids=rendered.token_ids, message_indices=rendered.message_indices,
                                     roles=roles, sampled_mask=rendered.sampled_mask,
                                     is_content=rendered.is_content)


def conversation(pb: render_pb2.Conversation) -> tuple[list[dict], list[dict] | None]:
    total = sum(len(m.content) + len(m.reasoning_content) + sum(len(p.text) for p in m.parts)
                + sum(len(c.arguments_json) for c in m.tool_calls) for m in pb.messages)
    if total > MAX_CHARS_PER_CONVERSATION:
        raise renderers.RenderError(f"messages: {total} characters of content is over the limit of "
                                    f"{MAX_CHARS_PER_CONVERSATION} per conversation")
    return [wire.message_from_pb(m) for m in pb.messages], [wire.tool_from_pb(t) for t in pb.tools] or None


def supervised_to_pb(renderer: BaseRenderer, messages, tools, train_on_what: int, sft_roles) -> render_pb2.SupervisedExample:
    if train_on_what not in _TRAIN_ON_WHAT:
        raise renderers.RenderError(f"train_on_what: unknown value {train_on_what}")
    example = renderer.supervised_example(messages, _TRAIN_ON_WHAT[train_on_what], tools, list(sft_roles))
    return render_pb2.SupervisedExample(tokens=rendered_to_pb(example.rendered, messages, renderer),
                                        weights=example.weights)


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    """Rendering is CPU work: it runs in a thread so the event loop keeps answering health checks."""

    async def ListRenderers(self, request, context):
        return render_pb2.ListRenderersResponse(renderers=[
            render_pb2.RendererInfo(name=name, aliases=aliases, description=description)
            for name, aliases, description in renderers.list_renderers()])

    async def Render(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = renderer_for(request.renderer)
            rendered = renderer.render(messages, tools, request.add_generation_prompt)
            return rendered_to_pb(rendered, messages, renderer)

        return await asyncio.to_thread(run)

    async def BuildGenerationPrompt(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            prefill = request.prefill if request.HasField("prefill") else None
            renderer = renderer_for(request.renderer)
            rendered = renderer.render_generation_prompt(messages, prefill, tools)
            return rendered_to_pb(rendered, messages, renderer)

        return await asyncio.to_thread(run)

    async def BuildSupervisedExample(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            return supervised_to_pb(renderer_for(request.renderer), messages, tools, request.train_on_what,
                                    request.content_sft_roles)

        return await asyncio.to_thread(run)

    async def RenderBatch(self, request, context):
        def run():
            renderer = renderer_for(request.renderer)
            out = []
            for i, conv in enumerate(request.conversations):
                try:
                    messages, tools = conversation(conv)
                    if request.kind == render_pb2.SUPERVISED:
                        out.append(supervised_to_pb(renderer, messages, tools, request.train_on_what,
                                                    request.content_sft_roles))
                        continue
                    if request.kind == render_pb2.GENERATION_PROMPT:
                        rendered = renderer.render_generation_prompt(messages, None, tools)
                    else:
                        rendered = renderer.render(messages, tools, request.add_generation_prompt)
                    out.append(render_pb2.SupervisedExample(tokens=rendered_to_pb(rendered, messages, renderer)))
                except renderers.RenderError as exc:
                    raise renderers.RenderError(f"conversations[{i}].{exc}") from None
            return render_pb2.RenderBatchResponse(examples=out)

        return await asyncio.to_thread(run)

    async def BridgeToNextTurn(self, request, context):
        from render_service.renderers.bridge import bridge_to_next_turn

        def run():
            renderer = renderer_for(request.renderer)
            new_messages, tools = conversation(request.new_turn)
            history = [wire.message_from_pb(m) for m in request.history] or None
            rendered, reason = bridge_to_next_turn(renderer, list(request.prev_prompt_ids),
                                                   list(request.prev_completion_ids), new_messages, tools,
                                                   history=history)
            if rendered is None:
                return render_pb2.BridgeToNextTurnResponse(ok=False, reason=reason)
            roles = ["assistant"] * (max(rendered.message_indices, default=-1) + 1)
            for i, m in enumerate(new_messages):
                roles[i] = m["role"]
            return render_pb2.BridgeToNextTurnResponse(ok=True, reason=reason, tokens=render_pb2.RenderedTokens(
                token_ids=rendered.token_ids, message_indices=rendered.message_indices, roles=roles,
                sampled_mask=rendered.sampled_mask, is_content=rendered.is_content))

        return await asyncio.to_thread(run)

    async def ConversationsToData(self, request_iterator, context):
        from render_service.datasets import data_from_lines

        settings, number = None, 0
        async for request in request_iterator:
            settings = settings or request
            if settings.train_on_what not in _TRAIN_ON_WHAT:
                raise renderers.RenderError(f"train_on_what: unknown value {settings.train_on_what}")
            numbered = [("request", number + k + 1, line) for k, line in enumerate(request.lines)]
            number += len(request.lines)

            def run(numbered=numbered):
                renderer = renderer_for(settings.renderer)
                data = list(data_from_lines(numbered, renderer, _TRAIN_ON_WHAT[settings.train_on_what],
                                            settings.max_length or None, list(settings.content_sft_roles)))
                for datum in data:
                    count(renderer, len(datum.model_input.to_ints()) + 1)
                return render_pb2.DataBatch(data=[wire.datum_to_pb(d) for d in data])

            yield await asyncio.to_thread(run)

    async def ParseResponse(self, request, context):
        renderer = renderer_for(request.renderer)
        tools = [wire.tool_from_pb(t) for t in request.tools] or None
        message, ok = await asyncio.to_thread(renderer.parse_response, list(request.tokens), tools)
        return render_pb2.ParseResponseResponse(message=wire.message_to_pb(message), ok=ok)

    async def GetStopSequences(self, request, context):
        renderer = renderer_for(request.renderer)
        return render_pb2.StopSequences(token_ids=renderer.get_stop_sequences(), strings=renderer.get_stop_strings())


def add_to_server(server: Any) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]

