"""Qwen3 hybrid-thinking models (`qwen3`): Qwen2.5's ChatML and tool format plus `<think>` reasoning.

    [<|im_start|>system\n{system}[\n\n# Tools ...]<|im_end|>\n]       no default system prompt
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}[\n<tool_call>...</tool_call>]<|im_end|>\n
    <|im_start|>assistant\n[<think>\n\n</think>\n\n]     generation prompt (the block iff enable_thinking=False)

Shared pieces (ChatML turns, tools header, `<tool_call>` JSON, tool responses, parsing) live in qwen25.py.
Text is byte-identical to fixtures/templates/qwen3.jinja, so ids equal `apply_chat_template`. As there:
* The "last query" is the last user message that is not a `<tool_response>...</tool_response>` wrapper.
  Assistant messages after it keep their reasoning as `<think>` blocks; the final message always gets one
  (empty when it has no reasoning). Earlier assistant messages lose their reasoning.
* Without `reasoning_content`, content holding `</think>` is split: text before it is the reasoning.
* Reasoning is read from `reasoning_content`, else `thinking`, else `reasoning` (transformers aliases those).
* String tool-call arguments are written verbatim, others with `tojson`.
* The empty `<think>\n\n</think>\n\n` of the final message is sampled by the model, except with
  enable_thinking=False, where it is part of the generation prompt (scaffolding of that message).
Deliberate differences are those listed in qwen25.py; in particular content None / text parts renders as its
text, which is what later HF Qwen3 templates (with `is string` guards) do for None.
Stop tokens: <|im_end|> (151645) and <|endoftext|> (151643), as in Qwen3's generation_config.json.
Parsing: text before `</think>` (id 151668) is reasoning, then content, then calls by `<tool_call>` ids.
"""

from __future__ import annotations

from typing import Sequence

from render_service.renderers.base import Message, Segment, text_of
from render_service.renderers.qwen25 import (
    IM_START,
    Qwen25Renderer,
    check_messages,
    cut_at_stop,
    end_of_turn_segments,
    parse_content_and_calls,
    response_message,
    system_segments,
    tool_call_segments,
    tool_response_segments,
    turn_segments,
)
from render_service.renderers.registry import register_renderer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def reasoning_of(message: Message) -> str | None:
    """The message's reasoning under any of the names transformers accepts; None when absent."""
    value = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    return None if value is None else text_of(value)


def last_query_index(messages: Sequence[Message]) -> int:
    """Index of the last real user query (tool results wrapped as user text do not count)."""
    for i in range(len(messages) - 1, -1, -1):
        text = text_of(messages[i].get("content"))
        if messages[i]["role"] == "user" and not (
            text.startswith("<tool_response>") and text.endswith("</tool_response>")
        ):
            return i
    return len(messages) - 1


def split_reasoning(message: Message) -> tuple[str, str]:
    """(content, reasoning) as the template derives them, including `</think>` inside content."""
    content, reasoning = text_of(message.get("content")), reasoning_of(message)
    if reasoning is not None:
        return content, reasoning
    if THINK_CLOSE in content:
        before, after = content.split(THINK_CLOSE)[0], content.split(THINK_CLOSE)[-1]
        return after.lstrip("\n"), before.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return content, ""


class Qwen3Renderer(Qwen25Renderer):
    """Qwen3 (hybrid thinking): ChatML, <think> reasoning, <tool_call> JSON tool calls, enable_thinking option."""

    name = "qwen3"
    option_names = ("enable_thinking",)

    @property
    def thinking_disabled(self) -> bool:
        # The template tests `enable_thinking is false`: only an explicit False turns thinking off.
        return self.options.get("enable_thinking") is False

    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        check_messages(messages, "Qwen3")
        out = system_segments(messages, tools, default_system=None)
        query = last_query_index(messages)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user" or (role == "system" and i > 0):
                out += turn_segments(i, role, text_of(m.get("content")))
            elif role == "assistant":
                out += self.assistant_segments(messages, i, query)
            elif role == "tool":
                out += tool_response_segments(messages, i)
        if add_generation_prompt:
            out.append(Segment(f"{IM_START}assistant\n" + (EMPTY_THINK if self.thinking_disabled else "")))
        return out

    def assistant_segments(self, messages: Sequence[Message], i: int, query: int) -> list[Segment]:
        content, reasoning = split_reasoning(messages[i])
        is_last = i == len(messages) - 1
        out = [Segment(f"{IM_START}assistant\n", i)]
        if i > query and (is_last or reasoning):
            reasoning = reasoning.strip("\n")
            think = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"
            # With thinking off the generation prompt already holds the empty block: the model does not sample it.
            prompt_owned = think == EMPTY_THINK and self.thinking_disabled
            out += [
                Segment(think, i, is_content=not prompt_owned, sampled=not prompt_owned),
                Segment(content.lstrip("\n"), i, True, True),
            ]
        else:
            out.append(Segment(content, i, True, True))
        # The separator before the first call tests the content before lstrip, as the template does.
        out += tool_call_segments(i, messages[i], content, raw_string_arguments=True)
        return out + end_of_turn_segments(i)

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """Reasoning (before `</think>`), then content, then tool calls; ok = ended with a stop token."""
        body, stopped = cut_at_stop(tokens, self.get_stop_sequences())
        open_id = self.tokenizer.convert_tokens_to_ids(THINK_OPEN)
        close_id = self.tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        reasoning = ""
        if close_id in body:
            cut = body.index(close_id)
            thought, body = body[:cut], body[cut + 1 :]
            reasoning = self.tokenizer.decode(thought[1:] if thought[:1] == [open_id] else thought).strip("\n")
        elif body[:1] == [open_id]:
            # Thinking never closed (usually truncated): everything is reasoning.
            reasoning, body = self.tokenizer.decode(body[1:]).strip("\n"), []
        content, calls = parse_content_and_calls(self.tokenizer, body, tools, lstrip_content=True)
        return response_message(content, calls, reasoning), stopped


register_renderer(
    "qwen3",
    Qwen3Renderer,
    description="Qwen3 hybrid thinking: ChatML, <think> reasoning, <tool_call> JSON tool calls",
    # Hybrid-thinking checkpoints only (Qwen3-8B, Qwen3-30B-A3B, ...): the 2507 Instruct/Thinking, Coder and VL
    # models ship different templates.
    model_patterns=(
        "qwen/qwen3-[0-9]*b",
        "qwen/qwen3-[0-9]*b-base",
        "qwen/qwen3-[0-9]*b-fp8",
        "qwen/qwen3-[0-9]*b-awq",
    ),
)
