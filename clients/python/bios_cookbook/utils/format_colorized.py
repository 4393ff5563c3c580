"""`format_colorized(tokens, weights, tokenizer)`: prompt tokens green, completion tokens red."""

from render_service.renderers.display import format_colorized, format_html

__all__ = ["format_colorized", "format_html"]
