"""RenderService over gRPC: a thin translation between protobuf and the renderer library."""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import lru_cache
from typing import Any

from google.protobuf import json_format
from prometheus_client import Counter

from bios import wire
from bios.errors import BiosError, ResourceExhaustedError
from bios.v1 import render_pb2, render_pb2_grpc
from render_service import renderers, workers
from render_service.model_registry import resolve
from render_service.renderers.base import (TRAIN_ON_WHAT, BaseRenderer, RenderedTokens, validate_messages,
                                           validate_sft_roles)
from render_service.tokenizers import get_tokenizer

_TRAIN_ON_WHAT = {render_pb2.TRAIN_ON_WHAT_UNSPECIFIED: "last_assistant_message"} | {
    getattr(render_pb2, name.upper()): name for name in TRAIN_ON_WHAT
}
MAX_BYTES_PER_CONVERSATION = 4_000_000  # ~1M tokens; larger input is refused before any work is done
MAX_CONVERSATIONS_PER_BATCH = 4096  # a RenderBatch holds the render thread for its whole length
MAX_TOKEN_IDS = 1_000_000  # token ids in one ParseResponse / BridgeToNextTurn field
_RENDER_KINDS = frozenset(render_pb2.RenderKind.values())
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


@lru_cache(maxsize=256)
def _renderer(name: str, tokenizer_name: str, options_json: str, allow_local_paths: bool) -> BaseRenderer:
    import json

    if not tokenizer_name:
        raise renderers.RenderError("renderer.tokenizer: required (a model name or tokenizer directory)")
    options = json.loads(options_json)
    if not allow_local_paths:
        name = confine_options(name, options)
    name = name or resolve(tokenizer_name, allow_local_paths, "renderer.tokenizer").renderer
    tokenizer = get_tokenizer(tokenizer_name, allow_local_paths, "renderer.tokenizer")
    return renderers.get_renderer(name, tokenizer, tokenizer_name=tokenizer_name, **options)


def confine_options(name: str, options: dict[str, Any]) -> str:
    """What a caller may not make the server do without the operator's leave (--allow-local-paths): open its
    files, or run a template of the caller's own (a chat template's loops are unbounded, so one request could
    hold the render thread). Returns the renderer name with a declarative template resolved to its file."""
    if name.startswith("declarative:"):
        name = "declarative:" + template_file(name.split(":", 1)[1], "renderer.name")
    if isinstance(options.get("template"), str):  # declarative's template= option names a file too
        options["template"] = template_file(options["template"], "renderer.options.template")
    if "chat_template" in options:
        raise renderers.RenderError("renderer.options.chat_template: this server does not run callers' chat "
                                    "templates (use a declarative template, or the model's own)")
    return name


def template_file(template: str, field: str) -> str:
    """A declarative template a caller names: a bundled one, or a file under $BIOS_TEMPLATES_DIR."""
    import os
    from pathlib import Path

    from render_service.renderers.declarative import TEMPLATES_DIR

    bundled = TEMPLATES_DIR / f"{template}.json"
    if "/" not in template and "\\" not in template and ".." not in template and bundled.is_file():
        return str(bundled)
    root = os.environ.get("BIOS_TEMPLATES_DIR")
    path = Path(root, template).resolve() if root else None  # relative names are relative to the directory
    if path is None or not path.is_relative_to(Path(root).resolve()) or not path.is_file():
        raise renderers.RenderError(f"{field}: {template!r} is not a bundled template, and not under "
                                    "$BIOS_TEMPLATES_DIR")
    return str(path)


def renderer_for(spec: render_pb2.RendererSpec, allow_local_paths: bool) -> BaseRenderer:
    options = json_format.MessageToJson(spec.options, sort_keys=True, indent=None) if spec.HasField("options") else "{}"
    return _renderer(spec.name, spec.tokenizer, options, allow_local_paths)


def rendered_to_pb(rendered: RenderedTokens, renderer: BaseRenderer) -> render_pb2.RenderedTokens:
    count(renderer, len(rendered.token_ids))
    return wire.rendered_to_pb(rendered)


def conversation(pb: render_pb2.Conversation, field: str = "", extra_bytes: int = 0,
                 ) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools of a conversation; `field` prefixes the names in errors (e.g. "new_turn.")."""
    size = pb.ByteSize() + extra_bytes  # computed in C: reading every content field here would copy it once more
    if size > MAX_BYTES_PER_CONVERSATION:
        raise ResourceExhaustedError(f"{field}messages: {size} bytes is over the limit of "
                                     f"{MAX_BYTES_PER_CONVERSATION} per conversation")
    return messages_from_pb(pb.messages, f"{field}messages"), tools_from_pb(pb.tools, f"{field}tools") or None


def messages_from_pb(messages: Any, field: str) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        try:
            out.append(wire.message_from_pb(m))
        except wire.WireError as exc:
            raise renderers.RenderError(f"{field}[{i}].{exc}") from None
    return out


def tools_from_pb(tools: Any, field: str) -> list[dict]:
    return [wire.tool_from_pb(t, f"{field}[{k}]") for k, t in enumerate(tools)]


@lru_cache(maxsize=256)
def _token_limit(tokenizer_name: str, allow_local_paths: bool, tokenizer_size: int) -> int:
    return resolve(tokenizer_name, allow_local_paths, "renderer.tokenizer").token_limit(tokenizer_size)


def token_ids(ids: Any, renderer: BaseRenderer, spec: render_pb2.RendererSpec, allow_local_paths: bool,
              field: str) -> list[int]:
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


def train_on_what(value: int) -> str:
    if value not in _TRAIN_ON_WHAT:
        raise renderers.RenderError(f"train_on_what: unknown value {value}")
    return _TRAIN_ON_WHAT[value]


def sft_roles(roles: Any) -> list[str]:
    roles = list(roles)
    validate_sft_roles(roles)
    return roles


def supervised_to_pb(renderer: BaseRenderer, messages, tools, train_on: str, sft_roles,
                     into: render_pb2.SupervisedExample | None = None) -> render_pb2.SupervisedExample:
    example = renderer.supervised_example(messages, train_on, tools, sft_roles)
    pb = render_pb2.SupervisedExample() if into is None else into
    wire.rendered_to_pb(example.rendered, into=pb.tokens)
    pb.run_weights.extend(example.run_weights)
    return pb


def check_batch(request: render_pb2.RenderBatchRequest) -> None:
    """What holds for the whole batch, checked before it is cut into worker slices."""
    if request.kind not in _RENDER_KINDS:
        raise renderers.RenderError(f"kind: unknown value {request.kind}")
    if len(request.conversations) > MAX_CONVERSATIONS_PER_BATCH:
        raise ResourceExhaustedError(f"conversations: {len(request.conversations)} is over the limit of "
                                     f"{MAX_CONVERSATIONS_PER_BATCH} per request; send several requests")


def render_batch(request: render_pb2.RenderBatchRequest, allow_local_paths: bool) -> render_pb2.RenderBatchResponse:
    check_batch(request)
    train_on = train_on_what(request.train_on_what) if request.kind == render_pb2.SUPERVISED else None
    roles = sft_roles(request.content_sft_roles)
    renderer = renderer_for(request.renderer, allow_local_paths)
    response = render_pb2.RenderBatchResponse()
    add = response.examples.add  # filled in place: a finished example given to a constructor is copied
    for i, conv in enumerate(request.conversations):
        try:
            messages, tools = conversation(conv)
            if train_on is not None:
                supervised_to_pb(renderer, messages, tools, train_on, roles, into=add())
                continue
            if request.kind == render_pb2.GENERATION_PROMPT:
                rendered = renderer.render_generation_prompt(messages, None, tools)
            else:
                rendered = renderer.render(messages, tools, request.add_generation_prompt)
            wire.rendered_to_pb(rendered, into=add().tokens)
        except BiosError as exc:  # the same error, naming the caller's index of the conversation
            raise type(exc)(f"conversations[{request.first_index + i}].{exc}") from None
    return response


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
        return render_pb2.ListRenderersResponse(renderers=[
            render_pb2.RendererInfo(name=name, aliases=aliases, description=description)
            for name, aliases, description in renderers.list_renderers()])

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
            raise ResourceExhaustedError(f"prefill: {len(request.prefill)} characters is over the limit of "
                                         f"{MAX_BYTES_PER_CONVERSATION} bytes per conversation")
        return await in_render_thread(run)

    async def BuildSupervisedExample(self, request, context):
        def run():
            messages, tools = conversation(request.conversation)
            renderer = self._renderer(request.renderer)
            example = supervised_to_pb(renderer, messages, tools, train_on_what(request.train_on_what),
                                       sft_roles(request.content_sft_roles))
            count(renderer, len(example.tokens.token_ids))
            return example

        return await in_render_thread(run)

    async def RenderBatch(self, request, context):
        check_batch(request)
        if self.workers is not None and len(request.conversations) >= 2 * workers.MIN_SLICE:
            response = await self.workers.render_batch(request, self.allow_local_paths)
        else:
            response = await in_render_thread(render_batch, request, self.allow_local_paths)
        count(renderer_label(request.renderer, self.allow_local_paths),
              sum(len(e.tokens.token_ids) for e in response.examples), conversations=len(response.examples))
        return response

    async def BridgeToNextTurn(self, request, context):
        from render_service.renderers.bridge import bridge_to_next_turn

        def run():
            renderer = self._renderer(request.renderer)
            new_messages, tools = conversation(request.new_turn, "new_turn.")
            history = messages_from_pb(request.history, "history") or None
            # Checked here: inside the bridge a bad message only makes the re-render fail, answered ok=false.
            validate_messages(new_messages, "new_turn.messages", ordering=False)  # tool results answer the turn
            if history:
                validate_messages(history, "history")
            prompt = token_ids(request.prev_prompt_ids, renderer, request.renderer, self.allow_local_paths,
                               "prev_prompt_ids")
            completion = token_ids(request.prev_completion_ids, renderer, request.renderer, self.allow_local_paths,
                                   "prev_completion_ids")
            rendered, reason = bridge_to_next_turn(renderer, prompt, completion, new_messages, tools, history=history)
            response = render_pb2.BridgeToNextTurnResponse(ok=rendered is not None, reason=reason)
            if rendered is not None:
                wire.rendered_to_pb(rendered, into=response.tokens)
            return response

        return await in_render_thread(run)

    async def ConversationsToData(self, request_iterator, context):
        from render_service.datasets import data_from_lines

        settings, number = None, 0
        async for request in request_iterator:
            if settings is None:  # the first request's settings hold for the whole stream
                settings = request
                train_on = train_on_what(settings.train_on_what)
                roles = sft_roles(settings.content_sft_roles)
                if settings.max_length < 0:
                    raise renderers.RenderError(f"max_length: must be >= 0 (0 = no truncation), got "
                                                f"{settings.max_length}")
            numbered = []
            for line in request.lines:
                number += 1
                if len(line) > MAX_BYTES_PER_CONVERSATION:
                    raise ResourceExhaustedError(f"request, line {number}: {len(line)} characters is over the "
                                                 f"limit of {MAX_BYTES_PER_CONVERSATION} bytes per conversation")
                numbered.append(("request", number, line))

            def run(numbered=numbered):
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
            return render_pb2.StopSequences(token_ids=renderer.get_stop_sequences(),
                                            strings=renderer.get_stop_strings())

        return await in_render_thread(run)


def add_to_server(server: Any, render_workers: "workers.RenderWorkers | None" = None,
                  allow_local_paths: bool = False) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(render_workers, allow_local_paths), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]
