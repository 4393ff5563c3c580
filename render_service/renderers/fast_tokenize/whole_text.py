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

from render_service.renderers.fast_tokenize.checks import Unsupported, check_common, check_piecewise, normalizer_kind
from render_service.renderers.fast_tokenize.unicode_guards import nfc_invariant

MAX_TOKENS = 1 << 22  # with token lengths below 2**40 (checks.token_byte_lengths), int64 sums cannot overflow


def enabled() -> bool:
    return os.environ.get("BIOS_FASTOKENS", "1").lower() not in ("0", "false", "no", "off")


class WholeTextEngine:
    """Exact ids and token starts of a whole text (None where the per-call guards say no)."""

    def __init__(self, tokenizer: Any, spec: dict, token_lengths: list[int]):
        """`token_lengths`: the bytes each token id spells (checks.token_byte_lengths)."""
        try:
            import fastokens  # noqa: PLC0415 - optional: without it the exact piece path stays
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
        self._lengths = np.asarray(token_lengths, dtype=np.int64)

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(ids, byte end of each token, whether the text is ASCII) or None if this text needs another path.

        Per-token work stays in numpy: a rendered chat has hundreds of tokens and tens of segments."""
        if text.isascii():
            size, ascii_ = len(text), True
        else:
            try:
                size, ascii_ = len(text.encode("utf-8")), False
            except UnicodeEncodeError:  # lone surrogates have no UTF-8 form: whatever HF does, it does
                return None
            if self.nfc and not nfc_invariant(text):
                return None
        ids = np.frombuffer(self._encode_flat([text])[0], dtype="<u4")
        if ids.size > MAX_TOKENS:
            return None
        try:
            ends = self._lengths[ids].cumsum()
        except IndexError:  # an id beyond the table: not a token this engine knows how to place
            return None
        # The tokens must spell exactly the text's bytes (a token that is not byte-level counts 2**40: too many).
        if (int(ends[-1]) if ids.size else 0) != size:
            return None
        return ids, ends, ascii_

    def encode(self, text: str) -> list[int] | None:
        found = self._encode(text)
        return None if found is None else found[0].tolist()

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]] | None:
        """(ids, start character of each token), as HF's `offset_mapping` begins."""
        found = self._encode(text)
        if found is None:
            return None
        ids, ends, ascii_ = found
        starts = [0, *ends[:-1].tolist()] if ids.size else []
        if ascii_:  # bytes are characters
            return ids.tolist(), starts
        char_of_byte = []
        for k, ch in enumerate(text):
            char_of_byte += [k] * len(ch.encode("utf-8"))
        return ids.tolist(), [char_of_byte[s] for s in starts]

    def encode_segments(self, texts: Sequence[str]) -> tuple[list[int], list[int]] | None:
        """Ids of "".join(texts) and, per text, how many tokens start in it."""
        if not texts:
            return [], []
        found = self._encode("".join(texts))
        if found is None:
            return None
        ids, ends, ascii_ = found
        n = ids.size
        if ascii_:
            cuts = list(accumulate(map(len, texts)))
        else:
            cuts = list(accumulate(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts))
        # Tokens starting before byte c: the first one (if c > 0) and each later one whose predecessor ends
        # before c. The last cut is the end of the text: all n tokens start before it.
        before = (ends[:-1].searchsorted(cuts) + 1).tolist() if n else [0] * len(texts)
        before[-1] = n
        counts, last = [], 0
        for c, b in zip(cuts, before):
            b = b if c else 0
            counts.append(b - last)
            last = b
        return ids.tolist(), counts
