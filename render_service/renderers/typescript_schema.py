"""JSON schema -> the TypeScript-like tool declarations of the harmony format (gpt-oss), as the openai/gpt-oss-*
chat template's `render_typescript_type` and `render_tool_namespace` macros write them, quirks included.

Written to be byte-identical to templates/gpt-oss.jinja; where the template's own string concatenation fails
on a tool, RenderError names the tool.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from render_service.renderers.base import RenderError

MISSING = object()  # a key the template would see as undefined


def tojson(value: Any) -> str:
    """The template's `tojson` (transformers': json.dumps without ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def field(spec: Any, key: str) -> Any:
    """`spec.key` as the template sees it: MISSING unless spec is a mapping holding key."""
    return spec[key] if isinstance(spec, Mapping) and key in spec else MISSING


def truthy(value: Any) -> bool:
    return value is not MISSING and bool(value)


def ts_type(spec: Any) -> str:
    """The template's `render_typescript_type` macro: a JSON schema as a TypeScript-like type, quirks included
    (nested object members start on a new line indented by 16 spaces; a oneOf default by 20 spaces)."""
    kind = field(spec, "type")
    if kind == "array":
        items = field(spec, "items")
        if truthy(items):
            item_kind = field(items, "type")
            if item_kind in ("string", "number", "integer", "boolean"):
                out = {"integer": "number"}.get(item_kind, item_kind) + "[]"
            else:
                inner = ts_type(items)
                out = "any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]"
        else:
            out = "any[]"
        return out + (" | null" if truthy(field(spec, "nullable")) else "")
    if isinstance(kind, (list, tuple)) and kind:  # a union such as ["string", "null"]
        return " | ".join(map(str, kind)) if len(kind) > 1 else str(kind[0])
    variants = field(spec, "oneOf")
    if truthy(variants):
        # The template's object-variant check never fires (a loop-scoped `set`), so every variant is listed.
        out = ""
        for k, variant in enumerate(variants):
            out += ts_type(variant)
            if truthy(field(variant, "description")):
                out += "// " + field(variant, "description")
            if field(variant, "default") is not MISSING:
                out += " " * 20 + "// default: " + tojson(field(variant, "default"))
            if k < len(variants) - 1:
                out += " | \n"
        return out
    if kind == "string":
        if truthy(field(spec, "enum")):
            return '"' + '" | "'.join(map(str, field(spec, "enum"))) + '"'
        return "string" + (" | null" if truthy(field(spec, "nullable")) else "")
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "object":
        properties = field(spec, "properties")
        if not truthy(properties):
            return "object"
        required = field(spec, "required")
        required = required if truthy(required) else []
        members = [
            name + ("" if name in required else "?") + ": \n" + " " * 16 + ts_type(sub)
            for name, sub in properties.items()
        ]
        return "{\n" + ", ".join(members) + "}"
    return "any"


def functions_namespace(tools: list[dict]) -> str:
    """The template's `render_tool_namespace("functions", tools)`."""
    out = "## functions\n\nnamespace functions {\n\n"
    for n, tool in enumerate(tools):
        function = field(tool, "function")
        for key in ("description", "name"):
            if not isinstance(field(function, key), str):
                raise RenderError(
                    f"tools[{n}].function.{key}: missing (the gpt-oss template writes every tool's "
                    f"name and description)"
                )
        try:
            out += "// " + function["description"] + "\n" + "type " + function["name"] + " = "
            parameters = field(function, "parameters")
            properties: Any = field(parameters, "properties") if truthy(parameters) else MISSING
            if not truthy(properties):
                out += "() => any;\n\n"
                continue
            required = field(parameters, "required")
            required = required if truthy(required) else []
            out += "(_: {\n"
            for name, spec in properties.items():
                if truthy(field(spec, "description")):
                    out += "// " + spec["description"] + "\n"
                out += name + ("" if name in required else "?") + ": " + ts_type(spec)
                if field(spec, "default") is not MISSING:
                    if truthy(field(spec, "enum")):
                        out += ", // default: " + spec["default"]
                    elif truthy(field(spec, "oneOf")):
                        out += "// default: " + spec["default"]
                    else:
                        out += ", // default: " + tojson(spec["default"])
                out += ",\n"
            out += "}) => any;\n\n"
        except (TypeError, AttributeError) as exc:  # where the template's own string concatenation fails
            raise RenderError(f"tools[{n}].function.parameters: the gpt-oss template cannot render it ({exc})") from exc
    return out + "} // namespace functions"
