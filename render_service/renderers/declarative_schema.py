"""The declarative template format (seed 003): a chat format written as data, validated by pydantic.

A `ConversationTemplate` holds one formatter per role. A formatter is a list of `TemplateComponent`s:

* `string`: literal text with placeholders `{{content}}` (the message text) and `{{reasoning_content}}`;
* `token`: one vocabulary token by name (`bos_token` / `eos_token` mean the tokenizer's own);
* `token_id`: token ids, written as their text (they must round-trip through the tokenizer);
* `tools`: the request's tools as JSON, one per line.

Other fields:

* `system_formatter`, `tools_formatter` (its `{{content}}` is the tools JSON; written after the first system
  message, or first), `role_formatters` (e.g. `tool`, `developer`), `tool_call_formatter` (its `{{content}}` is
  each call's `{"name", "arguments"}` JSON, appended to the assistant's content);
* `separator` (written between consecutive messages, and before a generation prompt), `special_starter` (once at
  the start), `special_stopper` (once at the end of a conversation rendered without a generation prompt; sampled
  when it ends an assistant turn whose formatter wrote no stop token); `stop_tokens` (else found, see
  declarative.py).

Load one with `ConversationTemplate.from_file(path)` (JSON, or YAML when PyYAML is installed) or
`ConversationTemplate.from_data(obj)`; errors name the field and never echo the input. declarative.py renders it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from render_service.renderers.base import RenderError

PLACEHOLDER_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PLACEHOLDERS = ("content", "reasoning_content")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateComponent(_Model):
    """The smallest unit of a template: a string (with placeholders), a token, token ids, or the tools list."""

    type: Literal["token", "token_id", "string", "tools"]
    content: Union[str, int, list[int], list[str]] = ""
    mask: bool = True  # in the assistant formatter: part of what the model samples (False: scaffolding)

    @property
    def text(self) -> str:
        """The content of a `string` or `token` component: a str (the validator below makes it one)."""
        return cast(str, self.content)

    @model_validator(mode="after")
    def _check(self) -> "TemplateComponent":
        if self.type in ("token", "string") and not isinstance(self.content, str):
            raise ValueError(f"{self.type} component: content must be a string, got {self.content!r}")
        if self.type in ("token", "string") and not self.content:
            raise ValueError(f"{self.type} component: content cannot be empty")
        if self.type == "token_id" and not (
            isinstance(self.content, int)
            or (isinstance(self.content, list) and self.content and all(isinstance(i, int) for i in self.content))
        ):
            raise ValueError(f"token_id component: content must be an int or a list of ints, got {self.content!r}")
        if self.type == "string" and isinstance(self.content, str):  # (not a str: refused above)
            unknown = set(PLACEHOLDER_RE.findall(self.content)) - set(PLACEHOLDERS)
            if unknown:
                raise ValueError(f"string component: unknown placeholder(s) {sorted(unknown)}; known: {PLACEHOLDERS}")
        return self


class BaseFormatter(_Model):
    template: list[TemplateComponent] = Field(default_factory=list)

    def has_placeholder(self) -> bool:
        return any(c.type == "string" and PLACEHOLDER_RE.search(c.text) for c in self.template)


class EmptyFormatter(BaseFormatter):
    """Fixed text: the message's content is not written (for datasets that are already formatted)."""

    type: Literal["empty"] = "empty"

    @model_validator(mode="after")
    def _no_placeholders(self) -> "EmptyFormatter":
        if self.has_placeholder():
            raise ValueError("empty formatter: must not contain placeholders")
        return self


class StringFormatter(BaseFormatter):
    """Components with `{{content}}` (and optionally `{{reasoning_content}}`) placeholders."""

    type: Literal["string"] = "string"

    @model_validator(mode="after")
    def _needs_placeholder(self) -> "StringFormatter":
        if not self.has_placeholder():
            raise ValueError("string formatter: needs a {{content}} placeholder")
        return self


class ListFormatter(BaseFormatter):
    """The template once per item (content parts of a message, or tools), joined by `separator`."""

    type: Literal["list"] = "list"
    separator: str = ""


Formatter = Annotated[Union[EmptyFormatter, StringFormatter, ListFormatter], Field(discriminator="type")]


class ConversationTemplate(_Model):
    user_formatter: Formatter
    assistant_formatter: Formatter
    system_formatter: Formatter | None = None
    tools_formatter: Formatter | None = None
    role_formatters: dict[str, Formatter] = Field(default_factory=dict)
    tool_call_formatter: Formatter | None = None
    separator: TemplateComponent | None = None
    special_starter: TemplateComponent | None = None
    special_stopper: TemplateComponent | None = None
    stop_tokens: list[str] | None = None
    template_name: str | None = None

    @field_validator("separator", "special_starter", "special_stopper")
    @classmethod
    def _plain_component(cls, value: TemplateComponent | None) -> TemplateComponent | None:
        if value is not None and (value.type == "tools" or PLACEHOLDER_RE.search(str(value.content))):
            raise ValueError(
                "separator/special_starter/special_stopper: must be a string, token or token_id "
                "component without placeholders"
            )
        return value

    @classmethod
    def from_file(cls, path: str | Path) -> "ConversationTemplate":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RenderError(f"template: cannot read {path}: {exc}") from exc
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # noqa: PLC0415 - optional dependency, needed only for a YAML template
            except ImportError as exc:
                raise RenderError(f"template: {path} is YAML but PyYAML is not installed; use JSON") from exc
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:  # no file excerpt in the message: only where it failed
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark else ""
                raise RenderError(f"template: {path} is not valid YAML{where}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RenderError(f"template: {path} is not valid JSON: {exc}") from None
        return cls.from_data(data, str(path))

    @classmethod
    def from_data(cls, data: Any, source: str = "template") -> "ConversationTemplate":
        """Validate a parsed JSON/YAML object; errors name the field, never echo the input."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False, include_context=False)
            )
            raise RenderError(f"template: {source}: {problems}") from None

    def formatter_for(self, role: str) -> BaseFormatter | None:
        if role in self.role_formatters:
            return self.role_formatters[role]
        return {
            "user": self.user_formatter,
            "assistant": self.assistant_formatter,
            "system": self.system_formatter,
        }.get(role)
