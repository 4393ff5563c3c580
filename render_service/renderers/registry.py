"""Renderer names -> renderer classes, and model names -> their default renderer.

Each family module registers itself when imported; `FAMILY_MODULES` lists them.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any

from render_service.renderers.base import BaseRenderer, RenderError

FAMILY_MODULES = (
    "chat_template",
    "chatml",
    "qwen25",
    "qwen3",
    "llama3",
    "deepseek_v3",
    "gpt_oss",
    "mistral_nemo",
    "declarative",
)

_RENDERERS: dict[str, type[BaseRenderer]] = {}
_ALIASES: dict[str, str] = {}
_DESCRIPTIONS: dict[str, str] = {}
_MODEL_PATTERNS: list[tuple[str, str]] = []  # (fnmatch pattern on the lower-cased model name, renderer)


def register_renderer(
    name: str,
    cls: type[BaseRenderer],
    aliases: tuple[str, ...] = (),
    description: str = "",
    model_patterns: tuple[str, ...] = (),
) -> None:
    _RENDERERS[name] = cls
    _DESCRIPTIONS[name] = description or (cls.__doc__ or name).strip().splitlines()[0]
    for alias in aliases:
        _ALIASES[alias] = name
    _MODEL_PATTERNS.extend((pattern.lower(), name) for pattern in model_patterns)


def canonical_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _RENDERERS:
        known = sorted([*_RENDERERS, *_ALIASES])
        raise RenderError(f"renderer: unknown renderer {name!r}; known: {', '.join(known)}")
    return name


def renderer_for_model(model_name: str) -> str | None:
    """The renderer registered for a model name (e.g. 'Qwen/Qwen3-8B' -> 'qwen3'), or None."""
    lowered = model_name.lower()
    matches = [(len(p), r) for p, r in _MODEL_PATTERNS if fnmatch.fnmatch(lowered, p)]
    return max(matches)[1] if matches else None


def get_renderer(name: str, tokenizer: Any, *, tokenizer_name: str | None = None, **options: Any) -> BaseRenderer:
    """A renderer by name over `tokenizer`; options mean what the same-named apply_chat_template kwargs mean.

    `declarative:<template>` names a declarative template: a bundled name (e.g. `chatml`) or a file path.
    A family whose special tokens the tokenizer lacks is refused (RenderError naming both; `tokenizer_name` is
    how the error names the tokenizer)."""
    if name.startswith("declarative:"):
        name, options["template"] = "declarative", name.split(":", 1)[1]
    renderer = _RENDERERS[canonical_name(name)](tokenizer, **options)
    renderer.check_tokenizer(tokenizer_name)
    return renderer


def list_renderers() -> list[tuple[str, list[str], str]]:
    """(name, aliases, description) for every registered renderer."""
    return [
        (name, sorted(a for a, target in _ALIASES.items() if target == name), _DESCRIPTIONS[name])
        for name in sorted(_RENDERERS)
    ]


for _module in FAMILY_MODULES:
    try:
        importlib.import_module(f"render_service.renderers.{_module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"render_service.renderers.{_module}":
            raise
