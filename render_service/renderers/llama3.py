"""Llama 3.1 / 3.3 (`llama3.1`, alias `llama3`) and Llama 3.2 (`llama3.2`) instruct models.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
    [Environment: ipython\n][Tools: brave_search, wolfram_alpha\n\n]        with tools / builtin_tools (3.1)
    Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n
    [tool instructions + tool json, when tools_in_user_message=False]{system content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n[tool instructions + tool json]{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{content | {"name": ..., "parameters": {...}}}<|eot_id|>
    <|start_header_id|>ipython<|end_header_id|>\n\n{tool result as a JSON string}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n                                   generation prompt

The text is byte-identical to the fixture templates (templates/llama3.1.jinja, identical to llama3.3.jinja,
and templates/llama3.2.jinja), so ids equal `apply_chat_template`. The template emits <|begin_of_text|> itself;
like HF we tokenize with add_special_tokens=False, so the tokenizer's post-processor adds no second BOS.
Template behaviour we follow on purpose:
* Options mean the same-named template variables: `date_string` (3.1 default "26 Jul 2024"; 3.2 default is
  today's date as "%d %b %Y", which is what HF's `strftime_now` gives, so pin it for reproducible data),
  `tools_in_user_message` (default True: tools go into the first user message), `custom_tools` (replaces
  `tools`), `builtin_tools` (3.1 only, e.g. ["brave_search", "code_interpreter"]; 3.2 ignores it as its
  template does).
* system/user/assistant content is trimmed (jinja `trim`); tool (and ipython) results are not trimmed but
  written through `tojson`, so a string result appears JSON-quoted (strings are "iterable" to the template).
* An assistant tool call is `{"name": "<name>", "parameters": <arguments as JSON>}`; the message content next
  to a tool call is dropped, as the template does. With `builtin_tools` set (3.1), a call to a builtin tool is
  `<|python_tag|>name.call(k="v", ...)`, and every tool-call turn ends with <|eom_id|> instead of <|eot_id|>.
* JSON is written like HF's `tojson`: `json.dumps(x, ensure_ascii=False)`, indent=4 for declared tools.
* Text that looks like a special token (e.g. "<|eot_id|>" typed inside content) becomes that special token,
  because the whole conversation is tokenized in one pass, exactly as HF does.
* `reasoning_content` is not rendered (the templates have no place for it).
Where we differ from the template, always loudly or on inputs the template cannot render:
* Tool-call arguments given as a JSON string are parsed first (as vLLM does); the template would `tojson` the
  string into a quoted string. Invalid JSON raises RenderError.
* More than one tool call in a message, an empty conversation, tools in the user message with no user message
  (the template raises) and a first non-system message that is not a user message while tools go into it (the
  template would put, e.g., an assistant's text into a user turn) raise RenderError naming message and field.
* Content given as a list of text parts, or None, is rendered as its joined text ("" for None); the template
  would render the Python repr of the list. `tool_calls` of None or [] means no tool calls (HF drops None
  keys; the template raises on []).
Stop tokens: <|eot_id|> (128009) and <|eom_id|> (128008). The fixtures have no generation_config.json (the
hub's lists [128001, 128008, 128009]), so these two are stated here; <|end_of_text|> is never emitted by
the instruct templates.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any, Sequence

from render_service.renderers import tool_calls as tc
from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, call_name_and_arguments, text_of
from render_service.renderers.registry import register_renderer

BOS, EOT, EOM, PYTHON_TAG = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"
KNOWLEDGE = "Cutting Knowledge Date: December 2023\n"
CALL_FORMAT = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
SYSTEM_TOOLS_INTRO = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    + CALL_FORMAT
    + "Do not use variables.\n\n"
)
USER_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n" + CALL_FORMAT + "Do not use variables.\n\n"
)
BUILTIN_CALL = re.compile(r"\s*([A-Za-z_]\w*)\.call\((.*)\)\s*", re.DOTALL)
BUILTIN_ARG = re.compile(r'([A-Za-z_]\w*)="(.*?)"(?:, |$)', re.DOTALL)


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def tojson(value: Any, indent: int | None = None) -> str:
    """HF's `tojson` filter: no ASCII escaping, default separators, insertion order."""
    compact = json.dumps(value, ensure_ascii=False)  # C encoder; `indent` forces the pure-Python one
    return compact if indent is None else _indented(compact, indent)


@functools.lru_cache(maxsize=512)
def _indented(compact: str, indent: int) -> str:
    """The indented form of the same value: the compact text fixes it (key order, types, float reprs)."""
    return json.dumps(json.loads(compact), ensure_ascii=False, indent=indent)


def tool_calls_of(i: int, message: Message) -> list[dict]:
    """The message's tool calls ([] for none); only assistant messages may carry them."""
    calls = message.get("tool_calls") or []
    if calls and message["role"] != "assistant":
        raise RenderError(f"messages[{i}].tool_calls: only assistant messages can carry tool calls")
    return list(calls)


def call_parts(i: int, call: dict) -> tuple[str, dict]:
    """(name, arguments as a dict) of messages[i].tool_calls[0]; JSON-string arguments are parsed."""
    name, arguments = call_name_and_arguments(i, 0, call)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RenderError(f"messages[{i}].tool_calls[0].function.arguments: not valid JSON ({exc})") from exc
    return name, arguments


class Llama31Renderer(BaseRenderer):
    """Llama 3.1 / 3.3 instruct: header-tagged turns, JSON tool calls, optional builtin (ipython) tools."""

    name = "llama3.1"
    option_names = ("custom_tools", "builtin_tools", "tools_in_user_message", "date_string")
    special_tokens = (BOS, "<|start_header_id|>", "<|end_header_id|>", EOT)
    supports_builtin_tools = True

    def default_date(self) -> str:
        return "26 Jul 2024"

    # ---- options, read like the template reads its variables --------------------------------------------

    def _tools(self, tools: list[dict] | None) -> list[dict] | None:
        custom = self.options.get("custom_tools")
        return custom if custom is not None else tools

    def _builtin_tools(self) -> list[str] | None:
        return self.options.get("builtin_tools") if self.supports_builtin_tools else None

    def _tools_in_user_message(self) -> bool:
        value = self.options.get("tools_in_user_message")
        return True if value is None else bool(value)

    def _date(self) -> str:
        value = self.options.get("date_string")
        return self.default_date() if value is None else str(value)

    # ---- rendering ----------------------------------------------------------------------------------------

    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        if not messages:
            raise RenderError("messages: empty conversation; the Llama 3 templates need at least one message")
        tools, builtin = self._tools(tools), self._builtin_tools()
        in_user = self._tools_in_user_message()
        rest = list(enumerate(messages))
        out = [Segment(BOS)]
        out += self._system_segments(rest, tools, builtin, in_user)
        if rest and rest[0][1]["role"] == "system":
            rest = rest[1:]
        if tools is not None and in_user:
            if not rest:
                raise RenderError(
                    "messages: tools go into the first user message (tools_in_user_message=True) "
                    "but there is no message after the system message"
                )
            i, first = rest.pop(0)
            if first["role"] != "user" or tool_calls_of(i, first):
                raise RenderError(
                    f"messages[{i}].role: tools go into the first user message "
                    f"(tools_in_user_message=True), but this message is {first['role']!r}"
                )
            declared = "".join(tojson(t, indent=4) + "\n\n" for t in tools)
            out += [
                Segment(header("user") + USER_TOOLS_INTRO + declared, i),
                Segment(text_of(first.get("content")).strip(), i, is_content=True),
                Segment(EOT, i),
            ]
        for i, m in rest:
            out += self._message_segments(i, m, builtin)
        if add_generation_prompt:
            out.append(Segment(header("assistant")))
        return out

    def _system_segments(self, rest: list[tuple[int, Message]], tools, builtin, in_user: bool) -> list[Segment]:
        """The system turn: always present; owned by messages[0] when that is a system message."""
        has_system = bool(rest) and rest[0][1]["role"] == "system"
        owner = 0 if has_system else -1
        text = header("system")
        if builtin is not None or tools is not None:
            text += "Environment: ipython\n"
        if builtin is not None:
            text += "Tools: " + ", ".join(str(t) for t in builtin if t != "code_interpreter") + "\n\n"
        text += KNOWLEDGE + f"Today Date: {self._date()}\n\n"
        if tools is not None and not in_user:
            text += SYSTEM_TOOLS_INTRO + "".join(tojson(t, indent=4) + "\n\n" for t in tools)
        body = text_of(rest[0][1].get("content")).strip() if has_system else ""
        return [Segment(text, owner), Segment(body, owner, is_content=has_system), Segment(EOT, owner)]

    def _message_segments(self, i: int, m: Message, builtin: list[str] | None) -> list[Segment]:
        role, calls = m["role"], tool_calls_of(i, m)
        if role in ("tool", "ipython"):
            result = tojson(text_of(m.get("content")))
            return [Segment(header("ipython"), i), Segment(result, i, is_content=True), Segment(EOT, i)]
        if calls:
            if len(calls) != 1:
                raise RenderError(
                    f"messages[{i}].tool_calls: {self.name} renders exactly one tool call per message "
                    f"(got {len(calls)}); the template raises 'only supports single tool-calls'"
                )
            body = self._call_text(i, calls[0], builtin)
            end = EOM if builtin is not None else EOT
            return [Segment(header("assistant"), i), Segment(body, i, True, True), Segment(end, i, True, True)]
        sampled = role == "assistant"
        return [
            Segment(header(role), i),
            Segment(text_of(m.get("content")).strip(), i, True, sampled),
            Segment(EOT, i, is_content=sampled, sampled=sampled),
        ]

    def _call_text(self, i: int, call: dict, builtin: list[str] | None) -> str:
        name, arguments = call_parts(i, call)
        if builtin is not None and name in builtin:
            # The template concatenates `name="value"` pairs, so only string values can be written.
            if not isinstance(arguments, dict):
                raise RenderError(
                    f"messages[{i}].tool_calls[0].function.arguments: a builtin tool call needs "
                    f"an object of string arguments, got {type(arguments).__name__}"
                )
            pairs = []
            for key, value in arguments.items():
                if not isinstance(value, str):
                    raise RenderError(
                        f"messages[{i}].tool_calls[0].function.arguments.{key}: builtin tool "
                        f"arguments must be strings, got {type(value).__name__}"
                    )
                pairs.append(f'{key}="{value}"')
            return f"{PYTHON_TAG}{name}.call({', '.join(pairs)})"
        return f'{{"name": "{name}", "parameters": {tojson(arguments)}}}'

    # ---- sampling -----------------------------------------------------------------------------------------

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(EOT), self.tokenizer.convert_tokens_to_ids(EOM)]

    def _decode(self, ids: Sequence[int]) -> str:
        # The Llama configs say clean_up_tokenization_spaces=True, which would eat spaces before punctuation.
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """ok = the response ended with <|eot_id|> or <|eom_id|>; a malformed tool call carries its status.

        A tool call is a response that starts with <|python_tag|> (builtin `name.call(...)`, raw code for
        code_interpreter, or JSON) or whose text starts with `{"name"` (the JSON format the prompt asks for).
        """
        tokens, stops = list(tokens), set(self.get_stop_sequences())
        end = next((k for k, t in enumerate(tokens) if t in stops), None)
        body, closed = (tokens, False) if end is None else (tokens[:end], True)
        python_tag = self.tokenizer.convert_tokens_to_ids(PYTHON_TAG)
        if body and body[0] == python_tag:
            text = self._decode(body[1:])
            call = (
                tc.parse_json_call(text.strip(), tools, closed)
                if text.lstrip().startswith("{")
                else self._parse_builtin(text, tools, closed)
            )
            return {"role": "assistant", "content": "", "tool_calls": [call]}, closed
        text = self._decode(body)
        if text.lstrip().startswith('{"name"'):
            call = tc.parse_json_call(text.strip(), tools, closed)
            return {"role": "assistant", "content": "", "tool_calls": [call]}, closed
        return {"role": "assistant", "content": text}, closed

    def _parse_builtin(self, text: str, tools: list[dict] | None, closed: bool) -> dict:
        """`name.call(k="v", ...)` (how the template writes builtin calls), else code for code_interpreter."""
        if not closed:
            return tc.make_call("", {}, tc.UNCLOSED, raw_text=text)
        builtin = list(self._builtin_tools() or [])
        match = BUILTIN_CALL.fullmatch(text)
        if match is None:
            return self._builtin_call("code_interpreter", {"code": text}, builtin, tools, text)
        name, inner = match.groups()
        pairs = BUILTIN_ARG.findall(inner)
        if ", ".join(f'{k}="{v}"' for k, v in pairs) != inner.strip():
            return tc.make_call(name, {}, tc.INVALID_JSON, raw_text=text)
        return self._builtin_call(name, dict(pairs), builtin, tools, text)

    @staticmethod
    def _builtin_call(name: str, arguments: dict, builtin: list[str], tools: list[dict] | None, raw: str) -> dict:
        if name in builtin:
            return tc.make_call(name, arguments)
        return tc.named_call(name, arguments, tools, raw)


class Llama32Renderer(Llama31Renderer):
    """Llama 3.2 instruct (1B/3B): as 3.1 without builtin tools; the default date is today's."""

    name = "llama3.2"
    supports_builtin_tools = False

    def default_date(self) -> str:
        # The 3.2 template calls strftime_now("%d %b %Y"); HF defines it as datetime.now().strftime.
        return datetime.now().strftime("%d %b %Y")


register_renderer(
    "llama3.1",
    Llama31Renderer,
    aliases=("llama3",),
    description="Llama 3.1 / 3.3 instruct: header-tagged turns, JSON tool calls, ipython tool results",
    model_patterns=(
        "meta-llama/llama-3.1-*-instruct*",
        "meta-llama/meta-llama-3.1-*-instruct*",
        "meta-llama/llama-3.3-*-instruct*",
    ),
)
register_renderer(
    "llama3.2",
    Llama32Renderer,
    description="Llama 3.2 instruct (1B/3B): as llama3.1 without builtin tools, date from strftime_now",
    model_patterns=("meta-llama/llama-3.2-1b-instruct*", "meta-llama/llama-3.2-3b-instruct*"),
)
