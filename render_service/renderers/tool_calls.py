"""Parsing sampled tool calls, shared by the families: JSON bodies with a status for every call.

A tool call dict has the OpenAI shape {"type": "function", "function": {"name", "arguments"}} plus
`status` (ok / invalid_json / unclosed / unknown_tool / missing_name) and, when it failed, `raw_text`.
"""

from __future__ import annotations

import json
from typing import Any

OK, INVALID_JSON, UNCLOSED, UNKNOWN_TOOL, MISSING_NAME = (
    "ok",
    "invalid_json",
    "unclosed",
    "unknown_tool",
    "missing_name",
)


def tool_names(tools: list[dict] | None) -> set[str] | None:
    """Names of the declared tools; None when no tools were declared (any name is accepted)."""
    if not tools:
        return None
    return {t.get("function", t).get("name", "") for t in tools}


def make_call(name: str, arguments: Any, status: str = OK, raw_text: str = "", call_id: str = "") -> dict:
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}, "status": status}
    if raw_text:
        call["raw_text"] = raw_text
    if call_id:
        call["id"] = call_id
    return call


def parse_json_call(body: str, tools: list[dict] | None = None, closed: bool = True) -> dict:
    """`{"name": ..., "arguments": {...}}` text (as Qwen / Hermes emit it) -> a tool call with a status."""
    if not closed:
        return make_call("", {}, UNCLOSED, raw_text=body)
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return make_call("", {}, INVALID_JSON, raw_text=body)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return make_call("", {}, MISSING_NAME, raw_text=body)
    arguments = data.get("arguments", data.get("parameters", {}))
    return named_call(data["name"], arguments, tools, body)


def named_call(name: str, arguments: Any, tools: list[dict] | None, raw_text: str = "") -> dict:
    """A call whose name and arguments are already separated; checks the name against the declared tools."""
    known = tool_names(tools)
    if known is not None and name not in known:
        return make_call(name, arguments, UNKNOWN_TOOL, raw_text=raw_text)
    return make_call(name, arguments)


def parse_arguments(text: str, name: str, tools: list[dict] | None) -> dict:
    """Arguments given as JSON text next to a separately known name (Llama, DeepSeek, gpt-oss)."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        return make_call(name, {}, INVALID_JSON, raw_text=text)
    return named_call(name, arguments, tools, text)
