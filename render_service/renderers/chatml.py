"""ChatML (`ultrasafe`, alias `chatml`): the format of the embedded usf-* development models.

<|im_start|>{role}\n{content}<|im_end|>\n   per message
<|im_start|>assistant\n                      generation prompt; the model stops at <|im_end|>
"""

from __future__ import annotations

from typing import Sequence

from render_service.renderers.base import BaseRenderer, Message, Segment, text_of
from render_service.renderers.registry import register_renderer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ChatMLRenderer(BaseRenderer):
    name = "ultrasafe"
    option_names = ()
    special_tokens = (IM_START, IM_END)
    cannot_represent = ("tools", "tool_calls", "reasoning_content")  # ChatML has only role and content

    def segments(self, messages: Sequence[Message], tools, add_generation_prompt: bool) -> list[Segment]:
        out: list[Segment] = []
        for i, m in enumerate(messages):
            sampled = m["role"] == "assistant"
            out += [
                Segment(f"{IM_START}{m['role']}\n", i),
                Segment(text_of(m.get("content")), i, is_content=True, sampled=sampled),
                # The closer is what the model emits to end its turn: sampled (and body) for the assistant.
                Segment(IM_END, i, is_content=sampled, sampled=sampled),
                Segment("\n", i),
            ]
        if add_generation_prompt:
            out.append(Segment(f"{IM_START}assistant\n"))
        return out

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(IM_END)]


register_renderer("ultrasafe", ChatMLRenderer, aliases=("chatml",), description="ChatML, the usf-* development models")
