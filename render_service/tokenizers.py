"""Tokenizers by model name, resolved through the model registry and cached per process."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from bios.errors import BiosError, FailedPreconditionError
from render_service.model_registry import resolve


@lru_cache(maxsize=32)
def load_tokenizer(source: str) -> Any:
    # Both import transformers, seconds of start-up: only a process that loads a tokenizer pays for it.
    if source == "builtin:qwen3":
        from render_service.builtin_tokenizers import qwen3_tokenizer  # noqa: PLC0415

        return qwen3_tokenizer()
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def get_tokenizer(name: str, allow_local_paths: bool = True, field: str = "tokenizer") -> Any:
    """The HF tokenizer of a model name (registry entry, $BIOS_MODELS_DIR, HF cache, or a local directory where
    `allow_local_paths`); a name that resolves to files that do not load is FAILED_PRECONDITION."""
    entry = resolve(name, allow_local_paths, field)
    try:
        return load_tokenizer(entry.tokenizer)
    except BiosError:
        raise
    except Exception as exc:  # noqa: BLE001 - a directory without tokenizer files, a corrupt tokenizer.json
        raise FailedPreconditionError(
            f"{field}: the tokenizer of {name!r} does not load ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
