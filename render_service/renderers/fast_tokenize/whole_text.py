"""The whole rendered text in one fastokens call; token starts from token byte lengths.

fastokens (Rust; reads the same tokenizer.json) reproduces the HF pipeline — added-token split,
normalizer, pre-tokenizer, BPE with HF's merge order — and is 5-10x faster than tiktoken and ~50x faster
than the tokenizers library on rendered chats here. It gives no offsets, so a token's start is the
running sum of the byte lengths of the tokens before it. That is exact when the bytes the tokens spell
are the text's own bytes: no normalizer, or NFC on text NFC provably leaves alone (`nfc_invariant`); a
byte-level vocabulary; no prefix space. Checked once per tokenizer (the same checks as the piece path
plus a probe text) and per call (the token bytes must add up to the text's).

Unlike the tiktoken path, equality with HF is not derived from the tokenizer's tables: it rests on
fastokens being a reimplementation of the same algorithm, checked by tests/test_fast_tokenize.py on
every run (every BMP code point in several contexts, random corpora with added tokens, hypothesis
segmentations, periodic multi-split strings) and by the golden digests. `BIOS_FASTOKENS=0` turns it off.
"""

from __future__ import annotations

import os
from itertools import accumulate
from typing import Any, Sequence

import numpy as np

from render_service.renderers.fast_tokenize.checks import (
    Unsupported,
    check_common,
    check_piecewise,
    normalizer_kind,
    token_byte_lengths,
)
from render_service.renderers.fast_tokenize.unicode_guards import check_text, nfc_invariant


def enabled() -> bool:
    return os.environ.get("BIOS_FASTOKENS", "1").lower() not in ("0", "false", "no", "off")


class WholeTextEngine:
    """Exact ids and token starts of a whole text (None where the per-call guards say no)."""

    def __init__(self, tokenizer: Any, spec: dict):
        try:
            import fastokens
        except ImportError:
            raise Unsupported("fastokens is not installed") from None
        check_common(spec)
        check_piecewise(spec)  # pre-tokenizers that keep every byte where it was; BPE without dropout
        normalizer = normalizer_kind(spec)
        if normalizer not in ("identity", "NFC"):
            raise Unsupported(f"normalizer {normalizer}")
        if (spec.get("model") or {}).get("byte_fallback"):
            raise Unsupported("byte_fallback BPE")
        self.nfc = normalizer == "NFC"
        backend = tokenizer.backend_tokenizer
        self._encode_flat = fastokens.Tokenizer.from_json_str(backend.to_str()).encode_batch_flat
        vocab = backend.get_vocab(with_added_tokens=False)
        self._lengths = np.array(token_byte_lengths(backend, vocab), dtype=np.int64)

    def _starts(self, text: str) -> tuple[np.ndarray, np.ndarray, bytes] | None:
        """(ids, byte start of each token, the text's UTF-8) or None if this text needs another path."""
        check_text(text)
        if self.nfc and not nfc_invariant(text):
            return None
        data = text.encode("utf-8")
        ids = np.frombuffer(self._encode_flat([text])[0], dtype=np.uint32)
        if len(ids) and ids.max() >= len(self._lengths):
            return None
        lengths = self._lengths[ids]
        ends = np.cumsum(lengths)
        if (ends[-1] if len(ends) else 0) != len(data):  # the tokens must spell exactly the text's bytes
            return None
        return ids, ends - lengths, data

    def encode(self, text: str) -> list[int] | None:
        found = self._starts(text)
        return None if found is None else found[0].tolist()

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]] | None:
        """(ids, start character of each token), as HF's `offset_mapping` begins."""
        found = self._starts(text)
        if found is None:
            return None
        ids, starts, data = found
        if len(data) == len(text):  # ASCII: bytes are characters
            return ids.tolist(), starts.tolist()
        lead = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80  # first byte of each character
        char_of_byte = np.cumsum(lead) - 1
        return ids.tolist(), char_of_byte[starts].tolist()

    def encode_segments(self, texts: Sequence[str]) -> tuple[list[int], list[int]] | None:
        """Ids of "".join(texts) and, per text, how many tokens start in it."""
        text = "".join(texts)
        found = self._starts(text)
        if found is None:
            return None
        ids, starts, data = found
        if len(data) == len(text):
            cuts = list(accumulate(map(len, texts)))
        else:
            cuts = list(accumulate(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts))
        before = np.searchsorted(starts, cuts[:-1], side="left").tolist()  # tokens starting before each cut
        before.append(len(ids))
        return ids.tolist(), [b - a for a, b in zip([0, *before], before)]
