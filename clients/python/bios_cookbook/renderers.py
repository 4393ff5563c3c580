"""The render service's renderer library, in-process: `renderers.get_renderer(name, tokenizer)`.

`BaseRenderer` here is what seed 000's custom renderers extend: a renderer made from a tokenizer alone that
renders with the tokenizer's own chat template (`ChatTemplateRenderer`), whose methods a subclass overrides and
calls through `super()`. The families' abstract base is `render_service.renderers.base.BaseRenderer`."""

from render_service.renderers import (
    Message,
    RenderedTokens,
    RenderError,
    Segment,
    SupervisedExample,
    canonical_name,
    format_colorized,
    format_html,
    get_renderer,
    list_renderers,
    register_renderer,
    renderer_for_model,
)
from render_service.renderers.chat_template import ChatTemplateRenderer

BaseRenderer = ChatTemplateRenderer

__all__ = [
    "BaseRenderer",
    "ChatTemplateRenderer",
    "Message",
    "RenderedTokens",
    "RenderError",
    "Segment",
    "SupervisedExample",
    "canonical_name",
    "format_colorized",
    "format_html",
    "get_renderer",
    "list_renderers",
    "register_renderer",
    "renderer_for_model",
]
