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
import sys
from array import array
from bisect import bisect_left
from itertools import accumulate
from typing import Any, Sequence

from render_service.renderers.fast_tokenize.checks import (
    Unsupported,
    check_common,
    check_piecewise,
    normalizer_kind,
)
from render_service.renderers.fast_tokenize.unicode_guards import nfc_invariant, utf8_length

_SWAP = sys.byteorder == "big"


def enabled() -> bool:
    return os.environ.get("BIOS_FASTOKENS", "1").lower() not in ("0", "false", "no", "off")


class WholeTextEngine:
    """Exact ids and token starts of a whole text (None where the per-call guards say no)."""

    def __init__(self, tokenizer: Any, spec: dict, token_lengths: list[int]):
        """`token_lengths`: the bytes each token id spells (checks.token_byte_lengths)."""
        try:
            import fastokens
        except ImportError:
            raise Unsupported("fastokens is not installed") from None
        check_common(spec)
        check_piecewise(spec)  # pre-tokenizers that keep every byte where it was; BPE without dropout
        normalizer = normalizer_kind(spec)
        if normalizer not in ("identity", "NFC"):
            raise Unsupported(f"normalizer {normalizer}")
        if array("I").itemsize != 4:
            raise Unsupported("no 4-byte unsigned array type on this platform")
        if (spec.get("model") or {}).get("byte_fallback"):
            raise Unsupported("byte_fallback BPE")
        self.nfc = normalizer == "NFC"
        backend = tokenizer.backend_tokenizer
        self._encode_flat = fastokens.Tokenizer.from_json_str(backend.to_str()).encode_batch_flat
        self._lengths = token_lengths

    def _encode(self, text: str) -> tuple[list[int], list[int], int] | None:
        """(ids, byte end of each token, the text's length in bytes) or None if this text needs another path."""
        size = utf8_length(text)
        if self.nfc and not nfc_invariant(text):
            return None
        flat = array("I", self._encode_flat([text])[0])  # little-endian uint32
        if _SWAP:
            flat.byteswap()
        ids = flat.tolist()
        try:
            ends = list(accumulate(map(self._lengths.__getitem__, ids)))
        except IndexError:  # an id beyond the table: not a token this engine knows how to place
            return None
        if (ends[-1] if ends else 0) != size:  # the tokens must spell exactly the text's bytes
            return None
        return ids, ends, size

    def encode(self, text: str) -> list[int] | None:
        found = self._encode(text)
        return None if found is None else found[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]] | None:
        """(ids, start character of each token), as HF's `offset_mapping` begins."""
        found = self._encode(text)
        if found is None:
            return None
        ids, ends, size = found
        starts = [0, *ends[:-1]] if ids else []
        if size == len(text):  # ASCII: bytes are characters
            return ids, starts
        char_of_byte = []
        for k, ch in enumerate(text):
            char_of_byte += [k] * len(ch.encode("utf-8"))
        return ids, [char_of_byte[s] for s in starts]

    def encode_segments(self, texts: Sequence[str]) -> tuple[list[int], list[int]] | None:
        """Ids of "".join(texts) and, per text, how many tokens start in it."""
        text = "".join(texts)
        found = self._encode(text)
        if found is None:
            return None
        ids, ends, size = found
        n = len(ids)
        if size == len(text):
            cuts = accumulate(map(len, texts[:-1]))
        else:
            cuts = accumulate(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts[:-1])
        # Tokens starting before byte c: the first one (if c > 0) and each later one whose predecessor ends before c.
        before = [bisect_left(ends, c, 0, n - 1) + 1 if c > 0 and n else 0 for c in cuts]
        before.append(n)
        return ids, [b - a for a, b in zip([0, *before], before)]
