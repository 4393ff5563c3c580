"""Fast, exact tokenization with per-token offsets for rendering (the module API).

`encode_segments(tokenizer, texts)` is what renderers call: the ids of the joined text and how many tokens
start in each text, exactly as one HF `return_offsets_mapping=True` call would give them. How it is
made fast, and why it is exact, is in encoder.py (the parts), whole_text.py (fastokens), checks.py (the
tiktoken equivalence) and unicode_guards.py (NFC). Encoders are built once per tokenizer object (1-4 s)
and cached with the tokenizer kept alive.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from contextlib import contextmanager
from itertools import accumulate
from typing import Any, Callable, Sequence

from render_service.renderers.fast_tokenize.checks import VERIFIED_PATTERNS, Unsupported, byte_to_char
from render_service.renderers.fast_tokenize.encoder import (
    PROBE_TEXT,
    FastEncoder,
    _PieceCache,
    slow_encode_with_offsets,
    trie_regex,
)
from render_service.renderers.fast_tokenize.unicode_guards import SlowPath, nfc_invariant

__all__ = [
    "PROBE_TEXT",
    "VERIFIED_PATTERNS",
    "FastEncoder",
    "Unsupported",
    "byte_to_char",
    "clear_piece_caches",
    "encode_segments",
    "encode_with_offsets",
    "fast_path_disabled",
    "fast_path_status",
    "forget",
    "get_fast_encoder",
    "nfc_invariant",
    "slow_encode_segments",
    "slow_encode_with_offsets",
    "trie_regex",
    "_PieceCache",
]

_ENCODERS: dict[int, tuple[Callable[[], object], "FastEncoder | None", str]] = {}  # id -> (weakref, encoder, why)
_BUILD_LOCK = threading.Lock()
_ENABLED = True  # off only inside `fast_path_disabled()` (benchmarks measure the slow path with it)


def _cached(tokenizer: Any) -> tuple | None:
    entry = _ENCODERS.get(id(tokenizer))
    if entry is not None and entry[0]() is tokenizer and (entry[1] is None or entry[1].describes(tokenizer)):
        return entry
    return None


def get_fast_encoder(tokenizer: Any) -> FastEncoder | None:
    """The fast encoder of `tokenizer` (built on first use, a few seconds), or None if unsupported."""
    entry = _cached(tokenizer)
    if entry is not None:
        return entry[1]
    with _BUILD_LOCK:
        entry = _cached(tokenizer)
        if entry is not None:
            return entry[1]
        try:
            encoder, reason = FastEncoder(tokenizer), "fast"
        except Unsupported as exc:
            encoder, reason = None, f"slow path: {exc}"
        except Exception as exc:  # noqa: BLE001 - anything unexpected while inspecting: stay exact (slow path)
            encoder, reason = None, f"slow path: {type(exc).__name__}: {exc}"
        key = id(tokenizer)

        def drop(_ref: object, key: int = key) -> None:
            _ENCODERS.pop(key, None)

        ref: Callable[[], object]
        try:  # the entry goes when the tokenizer does (before its id can be reused)
            ref = weakref.ref(tokenizer, drop)
        except TypeError:  # not weakly referenceable: keep it alive instead
            ref = (lambda kept: lambda: kept)(tokenizer)
        _ENCODERS[key] = (ref, encoder, reason)
        return encoder


def forget(tokenizer: Any) -> None:
    """Drop the cached encoder of `tokenizer` (after changing it in place in a way not detected)."""
    with _BUILD_LOCK:
        _ENCODERS.pop(id(tokenizer), None)


def fast_path_status(tokenizer: Any) -> str:
    """Which path `tokenizer` takes: 'fast: ...' (whole text and/or pieces, by what) or 'slow path: <reason>'."""
    encoder = get_fast_encoder(tokenizer)
    return _ENCODERS[id(tokenizer)][2] if encoder is None else encoder.describe()


def clear_piece_caches() -> None:
    """Empty every encoder's piece and word caches (benchmarks time a cold cache with it)."""
    for _ref, encoder, _reason in list(_ENCODERS.values()):
        if encoder is not None:
            encoder.clear_cache()


@contextmanager
def fast_path_disabled():
    """Within the block every call takes the slow path (process-wide; for benchmarks and tests)."""
    global _ENABLED
    saved, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = saved


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Exactly `tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`'s ids and begins."""
    encoder = get_fast_encoder(tokenizer) if _ENABLED else None
    if encoder is not None:
        try:
            return encoder.encode_with_offsets(text)
        except SlowPath:
            pass
    return slow_encode_with_offsets(tokenizer, text)


def slow_encode_segments(tokenizer: Any, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """The reference: one HF call; each token counted in the last non-empty text its first char is in."""
    ids, begins = slow_encode_with_offsets(tokenizer, "".join(texts))
    starts = list(accumulate(map(len, texts), initial=0))
    nonempty = [s for s, t in enumerate(texts) if t]
    nonempty_starts = [starts[s] for s in nonempty]
    counts = [0] * len(texts)
    for begin in begins:
        counts[nonempty[max(0, bisect.bisect_right(nonempty_starts, begin) - 1)]] += 1
    return ids, counts


def encode_segments(tokenizer: Any, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Ids of "".join(texts) and, per text, how many tokens start in it (fast where proven exact)."""
    encoder = get_fast_encoder(tokenizer) if _ENABLED else None
    if encoder is not None:
        try:
            return encoder.encode_segments(texts)
        except SlowPath:
            pass
    return slow_encode_segments(tokenizer, texts)
