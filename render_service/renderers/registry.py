"""Renderer names -> renderer classes, and model names -> their default renderer."""

from __future__ import annotations

from typing import Any

from render_service.renderers.base import BaseRenderer, RenderError
from render_service.renderers.chatml import ChatMLRenderer

_RENDERERS: dict[str, type[BaseRenderer]] = {}
_ALIASES: dict[str, str] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_renderer(name: str, cls: type[BaseRenderer], aliases: tuple[str, ...] = (), description: str = "") -> None:
    _RENDERERS[name] = cls
    _DESCRIPTIONS[name] = description or (cls.__doc__ or "").strip().splitlines()[0]
    for alias in aliases:
        _ALIASES[alias] = name


def canonical_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _RENDERERS:
        known = sorted([*_RENDERERS, *_ALIASES])
        raise RenderError(f"renderer: unknown renderer {name!r}; known: {', '.join(known)}")
    return name


def get_renderer(name: str, tokenizer: Any, **options: Any) -> BaseRenderer:
    """A renderer by name over `tokenizer`; options mean what the same-named apply_chat_template kwargs mean."""
    return _RENDERERS[canonical_name(name)](tokenizer, **options)


def list_renderers() -> list[tuple[str, list[str], str]]:
    """(name, aliases, description) for every registered renderer."""
    return [
        (name, sorted(a for a, target in _ALIASES.items() if target == name), _DESCRIPTIONS[name])
        for name in sorted(_RENDERERS)
    ]


register_renderer("ultrasafe", ChatMLRenderer, aliases=("chatml",), description="ChatML, the usf-* development models")
register_renderer("chat_template", BaseRenderer, aliases=("default",), description="the tokenizer's own chat template")
