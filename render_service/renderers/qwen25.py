"""Qwen2.5 instruct models (`qwen2.5`, alias `qwen25`), and the ChatML / Hermes-style pieces Qwen3 reuses.

    <|im_start|>system\n{system or the default Qwen prompt}[\n\n# Tools ... <tools>{tool json}...]<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}[\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>]...<|im_end|>\n
    <|im_start|>user\n<tool_response>\n{result}\n</tool_response>[\n<tool_response>...]<|im_end|>\n
    <|im_start|>assistant\n                                          generation prompt

The text is byte-identical to the model's chat template (fixtures/templates/qwen2.5.jinja), so the ids are
identical to `apply_chat_template`. Details that follow the template on purpose:
* JSON is written like HF's `tojson` filter: `json.dumps(x, ensure_ascii=False)`, keys in the caller's order,
  separators ", " and ": ". Qwen2.5 applies `tojson` to arguments even when they already are a JSON string,
  so string arguments come out as a quoted JSON string (pass dicts); parse_response then gives that string back.
* Consecutive tool messages share one `<|im_start|>user` turn.
* Text that looks like a special token (e.g. "<|im_end|>" typed inside content) becomes that special token,
  because the whole conversation is tokenized in one pass, exactly as HF does.
* `reasoning_content` is not rendered (the Qwen2.5 template has no place for it).
Where we differ from the template, always loudly:
* An empty conversation, a `developer` / `ipython` message (the template silently drops them) and a tool call
  without a name or arguments raise RenderError naming the message and field.
* Content given as a list of text parts, or None, is rendered as its joined text ("" for None); the template
  raises on those. The ids then equal HF's for the same message with string content.
Stop tokens: <|im_end|> (151645) and <|endoftext|> (151643), as in Qwen2.5-Instruct's generation_config.json.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from render_service.renderers import tool_calls as tc
from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, call_name_and_arguments, text_of
from render_service.renderers.registry import register_renderer

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>" + IM_END + "\n"
)
UNSUPPORTED_ROLES = ("developer", "ipython")


def tojson(value: Any) -> str:
    """HF's `tojson` filter: no ASCII escaping, default separators, insertion order."""
    return json.dumps(value, ensure_ascii=False)


# ---- rendering pieces shared with qwen3.py ------------------------------------------------------------


def check_messages(messages: Sequence[Message], family: str) -> None:
    """What the base validation allows but a Qwen template cannot render faithfully."""
    if not messages:
        raise RenderError("messages: empty conversation; the Qwen templates need at least one message")
    for i, m in enumerate(messages):
        if m["role"] in UNSUPPORTED_ROLES:
            raise RenderError(
                f"messages[{i}].role: {m['role']!r} is not supported by the {family} template "
                "(it would silently drop the message); use 'system' or 'user'"
            )


def system_segments(messages: Sequence[Message], tools: list[dict] | None, default_system: str | None) -> list[Segment]:
    """The leading system turn: the first system message (else `default_system`) plus the tools declaration."""
    has_system = messages[0]["role"] == "system"
    owner = 0 if has_system else -1
    body = [Segment(text_of(messages[0].get("content")), 0, is_content=True)] if has_system else []
    if not tools:
        if has_system:
            return [Segment(f"{IM_START}system\n", 0), *body, Segment(f"{IM_END}\n", 0)]
        return [Segment(f"{IM_START}system\n{default_system}{IM_END}\n")] if default_system is not None else []
    if not has_system and default_system is not None:
        body = [Segment(default_system)]
    separator = [Segment("\n\n", owner)] if body else []
    declared = "".join("\n" + tojson(tool) for tool in tools)
    return [
        Segment(f"{IM_START}system\n", owner),
        *body,
        *separator,
        Segment(TOOLS_INTRO + declared + TOOLS_OUTRO, owner),
    ]


def turn_segments(i: int, role: str, content: str) -> list[Segment]:
    """A plain `<|im_start|>{role}\\n{content}<|im_end|>\\n` turn of a message the model does not write."""
    return [Segment(f"{IM_START}{role}\n", i), Segment(content, i, is_content=True), Segment(f"{IM_END}\n", i)]


def tool_response_segments(messages: Sequence[Message], i: int) -> list[Segment]:
    """A tool result; a run of consecutive tool messages shares one user turn."""
    out = []
    if i == 0 or messages[i - 1]["role"] != "tool":
        out.append(Segment(f"{IM_START}user", i))
    out += [
        Segment("\n<tool_response>\n", i),
        Segment(text_of(messages[i].get("content")), i, is_content=True),
        Segment("\n</tool_response>", i),
    ]
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        out.append(Segment(f"{IM_END}\n", i))
    return out


def tool_call_text(i: int, k: int, call: dict, raw_string_arguments: bool) -> str:
    """`<tool_call>\\n{"name": "...", "arguments": ...}\\n</tool_call>` for messages[i].tool_calls[k].

    `raw_string_arguments`: Qwen3 writes string arguments verbatim; Qwen2.5 passes them through tojson too.
    """
    name, arguments = call_name_and_arguments(i, k, call)
    args = arguments if raw_string_arguments and isinstance(arguments, str) else tojson(arguments)
    return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


def tool_call_segments(i: int, message: Message, content: str, raw_string_arguments: bool) -> list[Segment]:
    """The sampled tool calls after `content`, each on its own line."""
    out = []
    for k, call in enumerate(message.get("tool_calls") or []):
        separator = "\n" if (k > 0 or content) else ""
        out.append(Segment(separator + tool_call_text(i, k, call, raw_string_arguments), i, True, True))
    return out


def end_of_turn_segments(i: int) -> list[Segment]:
    """The assistant's `<|im_end|>` is what it samples to stop; the newline after it is scaffolding."""
    return [Segment(IM_END, i, is_content=True, sampled=True), Segment("\n", i)]


# ---- parsing pieces shared with qwen3.py ---------------------------------------------------------------


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The sampled body before the first stop token, and whether a stop token was seen."""
    tokens, stops = list(tokens), set(stop_ids)
    end = next((k for k, t in enumerate(tokens) if t in stops), None)
    return (tokens, False) if end is None else (tokens[:end], True)


def parse_content_and_calls(
    tokenizer: Any, tokens: Sequence[int], tools: list[dict] | None, lstrip_content: bool = False
) -> tuple[str, list[dict]]:
    """Split sampled tokens at the `<tool_call>` / `</tool_call>` token ids into content text and calls.

    Text outside calls is content; the one newline the renderer puts before each call is removed again.
    """
    open_id = tokenizer.convert_tokens_to_ids(TOOL_CALL_OPEN)
    close_id = tokenizer.convert_tokens_to_ids(TOOL_CALL_CLOSE)
    pieces: list[str] = []
    calls: list[dict] = []
    k, tokens = 0, list(tokens)
    while True:
        start = next((j for j in range(k, len(tokens)) if tokens[j] == open_id), len(tokens))
        text = tokenizer.decode(tokens[k:start])
        if not pieces and lstrip_content:
            text = text.lstrip("\n")
        if start < len(tokens) and text.endswith("\n"):
            text = text[:-1]
        pieces.append(text)
        if start == len(tokens):
            break
        end = next((j for j in range(start + 1, len(tokens)) if tokens[j] == close_id), None)
        body = tokenizer.decode(tokens[start + 1 : end]).strip("\n")
        calls.append(tc.parse_json_call(body, tools, closed=end is not None))
        if end is None:
            break
        k = end + 1
    return "".join(pieces), calls


def response_message(content: str, calls: list[dict], reasoning: str = "") -> Message:
    message: Message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


class Qwen25Renderer(BaseRenderer):
    """Qwen2.5-Instruct: ChatML with a default system prompt and Hermes-style JSON tool calls."""

    name = "qwen2.5"
    option_names: tuple[str, ...] = ()
    special_tokens = (IM_START, IM_END)

    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        check_messages(messages, "Qwen2.5")
        out = system_segments(messages, tools, DEFAULT_SYSTEM)
        for i, m in enumerate(messages):
            role, content = m["role"], text_of(m.get("content"))
            if role == "user" or (role == "system" and i > 0):
                out += turn_segments(i, role, content)
            elif role == "assistant":
                out += [Segment(f"{IM_START}assistant\n", i), Segment(content, i, True, True)]
                out += tool_call_segments(i, m, content, raw_string_arguments=False)
                out += end_of_turn_segments(i)
            elif role == "tool":
                out += tool_response_segments(messages, i)
        if add_generation_prompt:
            out.append(Segment(f"{IM_START}assistant\n"))
        return out

    def get_stop_sequences(self) -> list[int]:
        # Qwen2.5-Instruct's generation_config stops on [<|im_end|>, <|endoftext|>].
        return [self.tokenizer.convert_tokens_to_ids(IM_END), self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """ok = the response ended with a stop token; malformed tool calls carry their own status."""
        body, stopped = cut_at_stop(tokens, self.get_stop_sequences())
        content, calls = parse_content_and_calls(self.tokenizer, body, tools)
        return response_message(content, calls), stopped


register_renderer(
    "qwen2.5",
    Qwen25Renderer,
    aliases=("qwen25",),
    description="Qwen2.5-Instruct: ChatML, default Qwen system prompt, <tool_call> JSON tool calls",
    model_patterns=(
        "qwen/qwen2.5-[0-9]*-instruct",
        "qwen/qwen2.5-[0-9]*-instruct-*",
        "qwen/qwen2.5-coder-[0-9]*-instruct",
        "qwen/qwen2.5-coder-[0-9]*-instruct-*",
    ),
)
