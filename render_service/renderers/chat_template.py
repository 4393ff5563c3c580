"""Attribution for any HF tokenizer's own chat template (the generic renderer).

The template is opaque Jinja, so message boundaries are recovered by rendering growing prefixes of
the conversation: the text a prefix adds belongs to its last message. Inside that text the message's
content is located verbatim; for an assistant message, the content and the text after it up to the end
token are what the model samples. Where a template rewrites earlier text when later messages arrive
(the prefix property fails), the whole text is kept as scaffolding: token ids stay exact, only
attribution is lost.
"""

from __future__ import annotations

from typing import Any, Sequence

from render_service.renderers.base import Message, RenderError, Segment, text_of


def _apply(tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RenderError("renderer: this tokenizer has no chat template; name a renderer explicitly")
    return tokenizer.apply_chat_template(
        list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **options
    )


def _message_segments(tokenizer: Any, text: str, index: int, message: Message) -> list[Segment]:
    content = text_of(message.get("content"))
    at = text.find(content) if content else -1
    if at < 0 or text.find(content, at + 1) >= 0:  # not found or ambiguous: the message without detail
        return [Segment(text, index)]
    assistant = message["role"] == "assistant"
    after = text[at + len(content):]
    eos = tokenizer.eos_token or ""
    closer = after[: after.find(eos) + len(eos)] if assistant and eos and eos in after else ""
    return [
        Segment(text[:at], index),
        Segment(content, index, is_content=True, sampled=assistant),
        Segment(closer, index, is_content=True, sampled=True),
        Segment(after[len(closer):], index),
    ]


def chat_template_segments(
    tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict
) -> list[Segment]:
    full = _apply(tokenizer, messages, tools, add_generation_prompt, options)
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        prefix = _apply(tokenizer, messages[: i + 1], tools, False, options)
        if not prefix.startswith(done) or not full.startswith(prefix):
            return [Segment(full)]
        segments += _message_segments(tokenizer, prefix[len(done):], i, m)
        done = prefix
    segments.append(Segment(full[len(done):]))
    return segments
