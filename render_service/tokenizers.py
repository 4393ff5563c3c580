"""Tokenizers by model name, resolved through the model registry and cached per process."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from render_service.model_registry import resolve


@lru_cache(maxsize=32)
def load_tokenizer(source: str) -> Any:
    if source == "builtin:qwen3":
        from render_service.builtin_tokenizers import qwen3_tokenizer

        return qwen3_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def get_tokenizer(name: str) -> Any:
    """The HF tokenizer of a model name (registry entry, local directory or HF cache)."""
    return load_tokenizer(resolve(name).tokenizer)
