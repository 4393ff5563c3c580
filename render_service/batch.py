"""Protobuf in, protobuf out: a request's renderer, its conversations, and a whole RenderBatch rendered.

No gRPC here: the render worker processes (workers.py) run `render_batch` on their slices, and the servicer
(service.py) runs the same code in its render thread.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from bios import wire
from bios.errors import BiosError, ResourceExhaustedError
from bios.v1 import render_pb2
from render_service import renderers
from render_service.model_registry import resolve
from render_service.renderers.base import TRAIN_ON_WHAT, BaseRenderer, validate_sft_roles
from render_service.renderers.declarative import TEMPLATES_DIR
from render_service.tokenizers import get_tokenizer

_TRAIN_ON_WHAT = {render_pb2.TRAIN_ON_WHAT_UNSPECIFIED: "last_assistant_message"} | {
    getattr(render_pb2, name.upper()): name for name in TRAIN_ON_WHAT
}
MAX_BYTES_PER_CONVERSATION = 4_000_000  # ~1M tokens; larger input is refused before any work is done
MAX_CONVERSATIONS_PER_BATCH = 4096  # a RenderBatch holds the render thread for its whole length
_RENDER_KINDS = frozenset(render_pb2.RenderKind.values())


@lru_cache(maxsize=256)
def _renderer(name: str, tokenizer_name: str, options_json: str, allow_local_paths: bool) -> BaseRenderer:
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
        raise renderers.RenderError(
            "renderer.options.chat_template: this server does not run callers' chat "
            "templates (use a declarative template, or the model's own)"
        )
    return name


def template_file(template: str, field: str) -> str:
    """A declarative template a caller names: a bundled one, or a file under $BIOS_TEMPLATES_DIR."""
    bundled = TEMPLATES_DIR / f"{template}.json"
    if "/" not in template and "\\" not in template and ".." not in template and bundled.is_file():
        return str(bundled)
    root = os.environ.get("BIOS_TEMPLATES_DIR")
    path = Path(root, template).resolve() if root else None  # relative names are relative to the directory
    if not root or path is None or not path.is_relative_to(Path(root).resolve()) or not path.is_file():
        raise renderers.RenderError(
            f"{field}: {template!r} is not a bundled template, and not under $BIOS_TEMPLATES_DIR"
        )
    return str(path)


def renderer_for(spec: render_pb2.RendererSpec, allow_local_paths: bool) -> BaseRenderer:
    options = json_format.MessageToJson(spec.options, sort_keys=True, indent=None) if spec.HasField("options") else "{}"
    return _renderer(spec.name, spec.tokenizer, options, allow_local_paths)


def conversation(
    pb: render_pb2.Conversation, field: str = "", extra_bytes: int = 0
) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools of a conversation; `field` prefixes the names in errors (e.g. "new_turn.")."""
    size = pb.ByteSize() + extra_bytes  # computed in C: reading every content field here would copy it once more
    if size > MAX_BYTES_PER_CONVERSATION:
        raise ResourceExhaustedError(
            f"{field}messages: {size} bytes is over the limit of {MAX_BYTES_PER_CONVERSATION} per conversation"
        )
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


def train_on_what(value: int) -> str:
    if value not in _TRAIN_ON_WHAT:
        raise renderers.RenderError(f"train_on_what: unknown value {value}")
    return _TRAIN_ON_WHAT[value]


def sft_roles(roles: Any) -> list[str]:
    roles = list(roles)
    validate_sft_roles(roles)
    return roles


def supervised_to_pb(
    renderer: BaseRenderer, messages, tools, train_on: str, sft_roles, into: render_pb2.SupervisedExample | None = None
) -> render_pb2.SupervisedExample:
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
        raise ResourceExhaustedError(
            f"conversations: {len(request.conversations)} is over the limit of "
            f"{MAX_CONVERSATIONS_PER_BATCH} per request; send several requests"
        )


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
