"""gpt-oss (`gpt-oss`, alias `harmony`): OpenAI's harmony format, as the openai/gpt-oss-* chat template writes it.

    <|start|>system<|message|>{identity}\\nKnowledge cutoff: 2024-06\\nCurrent date: {date}\\n\\nReasoning: {effort}
        \\n\\n[# Tools ...builtin tools...]# Valid channels: analysis, commentary, final. ...<|end|>
    <|start|>developer<|message|>[# Instructions\\n\\n{first system/developer message}\\n\\n][# Tools\\n\\n## functions
        \\n\\nnamespace functions {...} // namespace functions]<|end|>          only when there is either
    <|start|>user<|message|>{content}<|end|>
    <|start|>assistant<|channel|>analysis<|message|>{reasoning}<|end|>              last message only
    <|start|>assistant<|channel|>final<|message|>{content}<|return|>               <|end|> when not last
    [<|start|>assistant<|channel|>analysis<|message|>{content or reasoning}<|end|>] dropped once a later
    <|start|>assistant to=functions.{name}<|channel|>commentary json<|message|>{arguments json}<|call|>   answer exists
    <|start|>functions.{name} to=assistant<|channel|>commentary<|message|>{content as a JSON string}<|end|>
    <|start|>assistant                                 generation prompt; the model stops at <|return|> or <|call|>

The text is byte-identical to templates/gpt-oss.jinja (see the fixtures README), so ids equal
`apply_chat_template`. Options (the template's kwargs): `reasoning_effort` (default "medium"), `model_identity`,
`builtin_tools` (["browser", "python"]) and `current_date` ("YYYY-MM-DD" or a date; default today, which is what
the template's `strftime_now("%Y-%m-%d")` writes - tests pin both to one day).
Template behaviour we follow on purpose:
* Only the first tool call of an assistant message is rendered, and every tool result is named after the most
  recent call (the template assumes one call per message). Reasoning is only rendered on the last message
  (and before a tool call that no later answer follows), so the rendered conversation is not always an
  extension of an earlier generation prompt. Tool results and tool-call arguments go through `tojson` (a string
  result or string arguments come out JSON-quoted).
* Text that looks like a special token (e.g. "<|end|>" typed inside content) becomes that special token,
  because the conversation is tokenized in one pass, exactly as HF does.
Where we differ, always on inputs the template cannot render: a list of text parts is rendered as its joined
text (the template raises on user/assistant lists and prints a Python repr for a system list; a tool result
list keeps the template's `tojson` of the list); a system/developer/ipython message after the first one
raises (the template silently drops it); an empty conversation raises. Inputs the template raises on (a
missing content, `tool_calls: []`, a tool result after an answer, channel tags in content, content and
reasoning both on a tool call, a tool without a description) raise RenderError naming the field. As in HF,
keys whose value is None count as absent.
Stop tokens: <|return|> (200002, ends an answer) and <|call|> (200012, ends a tool call), the harmony format's
stops; the fixtures carry no generation_config.json, so the list is written here, not read from a file.
parse_response reads the channels by token id: analysis -> reasoning_content, final (and commentary without a
recipient) -> content, `to=functions.X` -> a tool call.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Sequence

from render_service.renderers import tool_calls as tc
from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, required_text, text_of
from render_service.renderers.registry import register_renderer
from render_service.renderers.typescript_schema import functions_namespace, tojson

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL = "<|return|>", "<|call|>"
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
FUNCTIONS_NOTE = "\nCalls to these tools must go to the commentary channel: 'functions'."
CHANNEL_TAGS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")
BROWSER = (
    "## browser\n\n// Tool for browsing.\n"
    "// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "// Cite information from the tool using the following format:\n"
    "// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "// Do not quote more than 10 words directly from the tool output.\n"
    "// sources=web (default: web)\nnamespace browser {\n\n"
    "// Searches for information related to `query` and displays `topn` results.\n"
    "type search = (_: {\nquery: string,\ntopn?: number, // default: 10\nsource?: string,\n}) => any;\n\n"
    "// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing "
    "`num_lines` lines.\n// Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
    "// If `cursor` is not provided, the most recent page is implied.\n"
    "// If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
    "// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on "
    "the most relevant passage, if available.\n"
    "// Use this function without `id` to scroll to a new location of an opened page.\n"
    "type open = (_: {\nid?: number | string, // default: -1\ncursor?: number, // default: -1\n"
    "loc?: number, // default: -1\nnum_lines?: number, // default: -1\nview_source?: boolean, // default: false\n"
    "source?: string,\n}) => any;\n\n"
    "// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.\n"
    "type find = (_: {\npattern: string,\ncursor?: number, // default: -1\n}) => any;\n\n} // namespace browser\n\n"
)
PYTHON = (
    "## python\n\nUse this tool to execute Python code in your chain of thought. The code will not be shown to the "
    "user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, "
    "it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the "
    "execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files."
    " Internet access for this session is UNKNOWN. Depends on the cluster.\n\n"
)
HEADER_RECIPIENT = re.compile(r"to=([^\s<]*)")
HEADER_CHANNEL = re.compile(r"<\|channel\|>\s*(\w*)")


def reasoning_of(m: Message) -> tuple[bool, Any]:
    """(present, text) of the message's reasoning; transformers passes reasoning_content to the template as
    `thinking`, keeping an explicit `thinking` key."""
    if "thinking" in m:
        return True, m["thinking"]
    value = next((m[k] for k in ("reasoning_content", "reasoning") if k in m), None)
    return value is not None, value


class GptOssRenderer(BaseRenderer):
    """gpt-oss: the harmony format with channels, a generated system message and TypeScript tool declarations."""

    name = "gpt-oss"
    option_names = ("current_date", "model_identity", "reasoning_effort", "builtin_tools")
    special_tokens = (START, MESSAGE, END, CHANNEL, RETURN)

    def current_date(self) -> str:
        value = self.options.get("current_date")
        if value is None:
            value = dt.datetime.now()
        return value.strftime("%Y-%m-%d") if hasattr(value, "strftime") else str(value)

    def system_text(self, has_tools: bool) -> str:
        identity = self.options.get("model_identity")
        effort = self.options.get("reasoning_effort")
        text = (
            f"{IDENTITY if identity is None else identity}\nKnowledge cutoff: 2024-06\n"
            f"Current date: {self.current_date()}\n\nReasoning: {'medium' if effort is None else effort}\n\n"
        )
        builtin = self.options.get("builtin_tools")
        if builtin:
            text += "# Tools\n\n" + (BROWSER if "browser" in builtin else "") + (PYTHON if "python" in builtin else "")
        return text + CHANNELS + (FUNCTIONS_NOTE if has_tools else "")

    def segments(self, messages: Sequence[Message], tools, add_generation_prompt: bool) -> list[Segment]:
        if not messages:
            raise RenderError("messages: empty conversation")
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]  # HF drops None-valued keys
        out = [Segment(f"{START}system{MESSAGE}{self.system_text(bool(tools))}{END}")]
        first = 1 if msgs[0]["role"] in ("system", "developer") else 0
        instructions = text_of(msgs[0].get("content")) if first else ""
        if instructions or tools:
            owner = 0 if instructions else -1
            out.append(Segment(f"{START}developer{MESSAGE}", owner))
            if instructions:
                out += [Segment("# Instructions\n\n", 0), Segment(instructions, 0, is_content=True), Segment("\n\n", 0)]
            if tools:
                out.append(Segment("# Tools\n\n" + functions_namespace(tools)))
            out.append(Segment(END, owner))
        last_call = None  # the template names each tool result after the latest call
        for i in range(first, len(msgs)):
            m, role = msgs[i], msgs[i]["role"]
            if role == "assistant":
                out += self.assistant_segments(msgs, i, add_generation_prompt)
                last_call = call_function(m, i)["name"] if "tool_calls" in m else None
            elif role == "tool":
                if last_call is None:
                    raise RenderError(
                        f"messages[{i}].role: tool result with no assistant tool call since the last "
                        f"answer (the gpt-oss template names a result after the latest call)"
                    )
                if "content" not in m:
                    raise RenderError(f"messages[{i}].content: missing")
                content = m["content"]
                out += [
                    Segment(f"{START}functions.{last_call} to=assistant{CHANNEL}commentary{MESSAGE}", i),
                    Segment(tojson(content), i, is_content=True),
                    Segment(END, i),
                ]
            elif role == "user":
                out += [
                    Segment(f"{START}user{MESSAGE}", i),
                    Segment(required_text(m, i, "gpt-oss"), i, is_content=True),
                    Segment(END, i),
                ]
            else:
                raise RenderError(
                    f"messages[{i}].role: {role!r} is only allowed as the first message "
                    f"(the gpt-oss template would drop it)"
                )
        if add_generation_prompt:
            out.append(Segment(f"{START}assistant"))
        return out

    def assistant_segments(self, msgs: list[Message], i: int, add_generation_prompt: bool) -> list[Segment]:
        m = msgs[i]
        content = text_of(m.get("content"))
        has_reasoning, reasoning = reasoning_of(m)
        if has_reasoning and not isinstance(reasoning, str):
            raise RenderError(f"messages[{i}].reasoning_content: expected a string")
        for name, text in (("content", content), ("reasoning_content", reasoning or "")):
            if any(tag in text for tag in CHANNEL_TAGS):
                raise RenderError(
                    f"messages[{i}].{name}: contains <|channel|> tags; pass the analysis text as "
                    f"reasoning_content and the final text as content"
                )
        # The role header is the generation prompt; all that follows is what the model samples.
        out = [Segment(f"{START}assistant", i)]

        def said(text: str) -> None:
            out.append(Segment(text, i, is_content=True, sampled=True))

        def analysis(text: str) -> None:
            said(f"{CHANNEL}analysis{MESSAGE}")
            said(text)
            said(f"{END}{START}assistant")

        if "tool_calls" in m:
            function = call_function(m, i)
            if content and reasoning:
                raise RenderError(
                    f"messages[{i}].content: a tool-calling message cannot have both content and "
                    f"reasoning_content (the gpt-oss template renders either as its analysis)"
                )
            answered_later = any(f["role"] == "assistant" and "tool_calls" not in f for f in msgs[i + 1 :])
            if (content or reasoning) and not answered_later:
                analysis(content or reasoning)
            said(f" to=functions.{function['name']}{CHANNEL}commentary {function.get('content_type', 'json')}{MESSAGE}")
            said(tojson(function["arguments"]))
            said(CALL)
        elif i == len(msgs) - 1 and not add_generation_prompt:
            if has_reasoning:
                analysis(reasoning)
            said(f"{CHANNEL}final{MESSAGE}")
            said(required_text(m, i, "gpt-oss"))
            said(RETURN)
        else:
            said(f"{CHANNEL}final{MESSAGE}")
            said(required_text(m, i, "gpt-oss"))
            said(END)
        return out

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(RETURN), self.tokenizer.convert_tokens_to_ids(CALL)]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """Sampled tokens (after `<|start|>assistant`) -> message. Messages are split at <|message|> and at the
        terminators <|end|> / <|return|> / <|call|>, by token id; the header before <|message|> gives the
        channel and the recipient."""
        ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in (MESSAGE, END, RETURN, CALL)}
        stops = (ids[END], ids[RETURN], ids[CALL])
        tokens = list(tokens)
        reasoning: list[str] = []
        content: list[str] = []
        calls: list[dict] = []
        pos, ended = 0, False
        while pos < len(tokens) and not ended:
            body_at = next((k for k in range(pos, len(tokens)) if tokens[k] == ids[MESSAGE]), None)
            if body_at is None:
                break  # truncated inside a header
            end_at = next((k for k in range(body_at + 1, len(tokens)) if tokens[k] in stops), None)
            header = self.tokenizer.decode(tokens[pos:body_at])
            body = self.tokenizer.decode(tokens[body_at + 1 : end_at])
            recipient = HEADER_RECIPIENT.search(header)
            channel = HEADER_CHANNEL.search(header)
            if recipient and recipient.group(1) != "assistant":
                name = recipient.group(1).removeprefix("functions.")
                if end_at is None:
                    calls.append(tc.make_call(name, {}, tc.UNCLOSED, raw_text=body))
                elif not name:
                    calls.append(tc.make_call("", {}, tc.MISSING_NAME, raw_text=body))
                else:
                    calls.append(tc.parse_arguments(body, name, tools))
            elif channel and channel.group(1) == "analysis":
                reasoning.append(body)
            else:
                content.append(body)
            if end_at is None:
                break
            ended = tokens[end_at] != ids[END]
            pos = end_at + 1
        message: Message = {"role": "assistant", "content": "\n".join(content)}
        if reasoning:
            message["reasoning_content"] = "\n".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        return message, ended


def call_function(m: Message, i: int) -> Mapping[str, Any]:
    """The first tool call's function (the only one the template renders), checked."""
    calls = m["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise RenderError(f"messages[{i}].tool_calls: expected a non-empty list (omit the key for no calls)")
    call = calls[0] if isinstance(calls[0], Mapping) else {}
    function = call.get("function") or call
    if not isinstance(function.get("name"), str):
        raise RenderError(f"messages[{i}].tool_calls[0].function.name: missing")
    if "arguments" not in function:
        raise RenderError(f"messages[{i}].tool_calls[0].function.arguments: missing (use {{}} for no arguments)")
    return function


register_renderer(
    "gpt-oss",
    GptOssRenderer,
    aliases=("harmony",),
    description="gpt-oss harmony format (channels, TypeScript tool declarations)",
    model_patterns=("openai/gpt-oss-*",),
)
