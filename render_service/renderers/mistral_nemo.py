"""Mistral Nemo (`mistral-nemo`, alias `tekken`): the [INST] format of mistralai/Mistral-Nemo-Instruct-2407.

    <s>
    [AVAILABLE_TOOLS][{"type": "function", "function": {...}}, ...][/AVAILABLE_TOOLS]  before the last user message
    [INST]{content}[/INST]                      the last message, if a user one: [INST]{system}\\n\\n{content}[/INST]
    {content}</s>
    [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]</s>       the message content is dropped
    [TOOL_RESULTS]{"content": {content}, "call_id": "abcDEF123"}[/TOOL_RESULTS]
    (no generation prompt: the model answers right after [/INST] or [/TOOL_RESULTS] and stops at </s>)

The text is byte-identical to templates/mistral-nemo.jinja, so ids equal `apply_chat_template`, and the
mistral-common references in golden/reference_digests.json are reproduced. Template behaviour we follow on
purpose:
* The system message is written into the LAST message only when that message is a user message, so a
  conversation that ends with an answer (a training example) has no system prompt, and its generation prompt is
  not a prefix of it. Tools go before the last user message (and before any earlier user message equal to it).
* After the optional system message, user and plain assistant messages must alternate starting with a user
  (tool calls and tool results aside); tool call ids and tool_call_id must be 9 characters long.
* A tool result is written unquoted, as given (mistral-common would JSON-quote a plain string); tool-call
  arguments go through `tojson`. `tools=[]` still writes an (empty) [AVAILABLE_TOOLS] block. reasoning_content is
  never rendered.
* Text that looks like a special token (e.g. "[INST]" typed inside content) becomes that special token, because
  the conversation is tokenized in one pass, exactly as HF does.
Where we differ, always on inputs the template cannot render: a list of text parts is rendered as its joined
text (the template raises on a user/assistant list and prints a Python repr of a tool-result list); a tool result
without content and `tool_calls: []` raise (the template would write `{"content": , ...` and a bare
`[TOOL_CALLS][`). Inputs the template raises on raise RenderError naming the field. As in HF, keys whose value is
None count as absent.
Stop token: </s> (the tokenizer's eos). parse_response finds [TOOL_CALLS] by token id and reads the JSON list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Sequence

from render_service.renderers import tool_calls as tc
from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, required_text, text_of
from render_service.renderers.registry import register_renderer

BOS, EOS = "<s>", "</s>"
INST, INST_END = "[INST]", "[/INST]"
TOOLS_OPEN, TOOLS_CLOSE = "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"
TOOL_CALLS = "[TOOL_CALLS]"
RESULTS_OPEN, RESULTS_CLOSE = "[TOOL_RESULTS]", "[/TOOL_RESULTS]"
ID_LENGTH = 9


def tojson(value: Any) -> str:
    """The template's `tojson` (transformers': json.dumps without ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: list[dict]) -> str:
    """[AVAILABLE_TOOLS]: string fields are written between quotes WITHOUT escaping, others with tojson."""
    entries = []
    for n, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            raise RenderError(f"tools[{n}].function: missing (expected an OpenAI tool dict)")
        fields = [
            f'"{key}": "{value}"' if isinstance(value, str) else f'"{key}": {tojson(value)}'
            for key, value in function.items()
            if key != "return"
        ]
        entries.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
    return TOOLS_OPEN + "[" + ", ".join(entries) + ("]" if entries else "") + TOOLS_CLOSE


def checked_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != ID_LENGTH:
        raise RenderError(
            f"{where}: the Mistral Nemo template requires 9-character alphanumeric tool call ids, got {value!r}"
        )
    return value


def check_alternation(msgs: list[Message], first: int) -> None:
    """User and plain assistant messages alternate, user first; tool calls and results are skipped."""
    turn = 0
    for i in range(first, len(msgs)):
        m = msgs[i]
        if m["role"] == "tool" or "tool_calls" in m:
            continue
        if (m["role"] == "user") != (turn % 2 == 0):
            expected = "user" if turn % 2 == 0 else "assistant"
            raise RenderError(
                f"messages[{i}].role: expected {expected!r} (after the optional system message, "
                f"roles must alternate user/assistant, tool calls and results aside), got {m['role']!r}"
            )
        turn += 1


class MistralNemoRenderer(BaseRenderer):
    """Mistral Nemo: [INST] turns, system prompt in the last user turn, JSON tool calls with 9-char ids."""

    name = "mistral-nemo"
    option_names = ()
    special_tokens = (BOS, EOS, INST, INST_END)

    def segments(self, messages: Sequence[Message], tools, add_generation_prompt: bool) -> list[Segment]:
        if not messages:
            raise RenderError("messages: empty conversation")
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]  # HF drops None-valued keys
        first = 1 if msgs[0]["role"] == "system" else 0
        system = text_of(msgs[0]["content"]) if first and "content" in msgs[0] else None
        check_alternation(msgs, first)
        users = [m for m in msgs[first:] if m["role"] == "user"]
        out = [Segment(BOS)]
        for i in range(first, len(msgs)):
            m, role = msgs[i], msgs[i]["role"]
            if role == "user":
                if tools is not None and m == users[-1]:  # the template compares by value
                    out.append(Segment(tools_block(tools)))
                out.append(Segment(INST, i))
                if i == len(msgs) - 1 and system is not None:
                    out += [Segment(system, 0, is_content=True), Segment("\n\n", i)]
                out += [Segment(required_text(m, i, "Mistral Nemo"), i, is_content=True), Segment(INST_END, i)]
            elif "tool_calls" in m:
                # The model samples the whole call list and the </s> after it; the message content is dropped.
                out.append(Segment(self.calls_text(m, i), i, is_content=True, sampled=True))
            elif role == "assistant":
                out += [
                    Segment(required_text(m, i, "Mistral Nemo"), i, is_content=True, sampled=True),
                    Segment(EOS, i, is_content=True, sampled=True),
                ]
            elif role == "tool":
                if "content" not in m:
                    raise RenderError(f"messages[{i}].content: missing (a tool result needs content)")
                call_id = checked_id(m.get("tool_call_id"), f"messages[{i}].tool_call_id")
                # The space after "content": belongs to the body: BPE merges it with the body's first symbol.
                out += [
                    Segment(RESULTS_OPEN + '{"content":', i),
                    Segment(" " + text_of(m["content"]), i, True),
                    Segment(f', "call_id": "{call_id}"}}' + RESULTS_CLOSE, i),
                ]
            else:
                raise RenderError(
                    f"messages[{i}].role: {role!r} is not supported here; the Mistral Nemo template "
                    f"allows user, assistant and tool messages after an optional first system message"
                )
        return out

    @staticmethod
    def calls_text(m: Message, i: int) -> str:
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise RenderError(f"messages[{i}].tool_calls: expected a non-empty list (omit the key for no calls)")
        entries = []
        for k, call in enumerate(calls):
            if not isinstance(call, Mapping) or "function" not in call:
                raise RenderError(f"messages[{i}].tool_calls[{k}].function: missing")
            call_id = checked_id(call.get("id"), f"messages[{i}].tool_calls[{k}].id")
            entries.append(tojson(call["function"])[:-1] + f', "id": "{call_id}"}}')
        return TOOL_CALLS + "[" + ", ".join(entries) + "]" + EOS

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(EOS)]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """Sampled tokens -> message: text before [TOOL_CALLS] (found by token id) is content, after it a JSON
        list of {"name", "arguments", "id"}; the message ends at </s>."""
        tokens = list(tokens)
        eos, marker = self.get_stop_sequences()[0], self.tokenizer.convert_tokens_to_ids(TOOL_CALLS)
        end = next((k for k, t in enumerate(tokens) if t == eos), None)
        body = tokens if end is None else tokens[:end]
        at = body.index(marker) if marker in body else None
        message: Message = {"role": "assistant", "content": self.tokenizer.decode(body if at is None else body[:at])}
        if at is not None:
            message["tool_calls"] = parse_call_list(self.tokenizer.decode(body[at + 1 :]), tools, end is not None)
        return message, end is not None


def parse_call_list(text: str, tools: list[dict] | None, closed: bool) -> list[dict]:
    """`[{"name": ..., "arguments": ..., "id": ...}, ...]` -> tool calls with a status each."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [tc.make_call("", {}, tc.INVALID_JSON if closed else tc.UNCLOSED, raw_text=text)]
    calls = []
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            calls.append(tc.make_call("", {}, tc.MISSING_NAME, raw_text=tojson(item)))
            continue
        call = tc.named_call(item["name"], item.get("arguments", {}), tools, tojson(item))
        if isinstance(item.get("id"), str):
            call["id"] = item["id"]
        calls.append(call)
    return calls


register_renderer(
    "mistral-nemo",
    MistralNemoRenderer,
    aliases=("tekken",),
    description="Mistral Nemo [INST] format with JSON tool calls",
    model_patterns=("mistralai/mistral-nemo*",),
)
