"""Attribution for any HF tokenizer's own chat template (the generic renderer).

The template is opaque Jinja, so message boundaries are recovered by rendering growing prefixes of
the conversation: the text a prefix adds belongs to its last message. Where a template rewrites
earlier text when later messages arrive (the prefix property fails), the whole text is kept as
scaffolding so token ids stay exact and only attribution is lost.
"""

from __future__ import annotations

from typing import Any, Sequence

from render_service.renderers.base import Message, RenderError, Segment


def _apply(tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RenderError("renderer: this tokenizer has no chat template; name a renderer explicitly")
    return tokenizer.apply_chat_template(
        list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **options
    )


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
        segments.append(Segment(prefix[len(done):], i, sampled=False))
        done = prefix
    segments.append(Segment(full[len(done):]))
    return segments
