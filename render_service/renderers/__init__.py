"""The renderer library: one small module per model family over a shared base."""

from render_service.renderers.base import BaseRenderer, Message, RenderedTokens, RenderError, Segment, SupervisedExample
from render_service.renderers.display import format_colorized, format_html
from render_service.renderers.registry import (
    canonical_name,
    get_renderer,
    list_renderers,
    register_renderer,
    renderer_for_model,
)

__all__ = [
    "BaseRenderer",
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
