"""The fast encoder of one tokenizer: exact ids and token starts, cheaper than the HF offsets call.

`tokenize_segments` needs the token ids of a rendered text plus, per token, which segment its first
character is in. One HF call with `return_offsets_mapping=True` gives both but costs about as much as
`apply_chat_template` itself. The encoder redoes what the HF fast tokenizer does with cheaper parts, and
only where each part is checked to be the same; anything else goes to that one HF call.

- Whole text (whole_text.py): one fastokens call for the rendered text, starts from token byte lengths.
- Otherwise, piece by piece:
  1. Added tokens. HF first cuts the text on its added tokens (leftmost-longest, an Aho-Corasick trie) and
     runs normalizer, pre-tokenizer and model on each remaining piece on its own. We cut with a
     trie-shaped regex over the same strings. Supported: no `lstrip`/`rstrip`/`single_word` flags,
     special tokens matched (`encode_special_tokens=False`); `normalized=True` added tokens only under an
     identity normalizer (then, as in HF, they are matched in a second pass over what the first left).
  2. Normalizer: none, or NFC. Under NFC a piece whose text NFC would change goes to the HF backend on
     its own (exact: HF treats pieces independently) with HF's offsets (unicode_guards.py).
  3. Pre-tokenizer + BPE: tiktoken over the tokenizer's own vocabulary where checks.py shows it is the
     same procedure; else (DeepSeek V3: chained Splits, a merge list that is not tiktoken-complete) one HF
     backend call on that piece alone, whose offsets are used as they are.
  4. Pieces (the text between two added tokens) are cached, LRU and bounded, keyed by their text: role
     headers, separators, repeated system prompts and tool blocks cost a dictionary lookup.

Tokens spanning a segment boundary belong to the segment of their first character, as in the slow path.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections import OrderedDict
from itertools import accumulate
from typing import Any, Sequence

import tiktoken

from render_service.renderers.fast_tokenize import whole_text
from render_service.renderers.fast_tokenize.checks import (
    VERIFIED_PATTERNS,
    Unsupported,
    backend_json,
    check_common,
    check_merges,
    check_piecewise,
    check_tiktoken,
    check_whole_words,
    normalizer_kind,
    ranks_from_vocab,
    token_byte_lengths,
)
from render_service.renderers.fast_tokenize.unicode_guards import _bmp_unassigned, check_text, nfc_invariant

# Compared with HF (ids and offsets) when an encoder is built: every character class of the patterns,
# NFC-sensitive sequences, CRLF, whitespace runs, emoji (multi-token characters) and digit runs.
PROBE_TEXT = (
    "Hello, World! It's 2024-06-01T12:34:56Z... I'M here; you'RE there — ok?\r\n\r\n"
    "  \t indented\n\n\n   trailing   \n"
    "中文测试，日本語のテキスト、한국어 텍스트. Ελληνικά Кириллица العربية עברית हिन्दी ไทย\n"
    "e\u0301 A\u030a \u1100\u1161\u11a8 \ufb01 \u212b \u00c5 caf\u00e9 cafe\u0301 \u0915\u093c\n"
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️ \U0001f600\U0001f600 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0\u2003\u3000 nbsp\n"
    "12345678901234567890 3.14159 1,000,000 ０１２３ ½ Ⅻ\n"
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n/* c */ a//b <tag attr=\"v\">x</tag>\n"
    "CamelCaseWords HTTPServer iPhone O'Neil don't WE'LL\u200b\u200d\ufeff\x00\x7f\x1b[0m \x1c \x85 x\u3000 y"
)

# Bounds of the per-tokenizer caches.
PIECE_CACHE_ENTRIES = 4096
PIECE_CACHE_TOKENS = 1 << 20  # ids held by the piece cache in total
PIECE_CACHE_MAX_CHARS = 1 << 15  # longer pieces are not cached
# Token starts inside a piece are found by walking token lengths when the boundary is this close (bytes)
# to the piece's start or end, else from the full prefix sums.
WALK_BYTES = 256


def slow_encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """The reference: HF's ids and `offset_mapping` begins, in one call."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [begin for begin, _ in enc["offset_mapping"]]


def trie_regex(words: Sequence[str]) -> re.Pattern:
    """A regex matching `words` leftmost-longest (like an Aho-Corasick LeftmostLongest automaton).

    Alternatives are factored into a trie, so the engine follows one path per start position; a word
    that is a prefix of another is an optional (greedy) tail, so the longest word on the path wins.
    """
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(emit(trie))


class _PieceCache:
    """Bounded LRU: piece text -> [ids, byte starts + [total] or None until needed].

    Lock-free: under the GIL each dict operation is atomic, and a lost race only costs a recomputation.
    """

    def __init__(self, max_entries: int = PIECE_CACHE_ENTRIES, max_tokens: int = PIECE_CACHE_TOKENS):
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._data: OrderedDict[str, list] = OrderedDict()
        self._tokens = 0

    def get(self, key: str) -> list | None:
        value = self._data.get(key)
        if value is not None:
            try:
                self._data.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key: str, value: list) -> None:
        n = len(value[0])
        if len(key) > PIECE_CACHE_MAX_CHARS or n > self.max_tokens // 8:
            return
        self._data[key] = value
        self._tokens += n
        while len(self._data) > self.max_entries or self._tokens > self.max_tokens:
            try:
                _, old = self._data.popitem(last=False)
            except KeyError:
                break
            self._tokens -= len(old[0])

    def clear(self) -> None:
        self._data.clear()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._data)


class FastEncoder:
    """Exact `tokenizer(text, add_special_tokens=False)` ids and token starts, without the HF call."""

    def __init__(self, tokenizer: Any, whole: bool | None = None):
        spec = backend_json(tokenizer)
        check_common(spec)
        backend = tokenizer.backend_tokenizer
        if getattr(backend, "encode_special_tokens", False) or getattr(tokenizer, "split_special_tokens", False):
            raise Unsupported("special tokens are not split out (split_special_tokens=True)")
        self._backend = backend
        # Bytes each token id spells: token starts inside a tiktoken piece, and every start on the whole-text path.
        self._nbytes = token_byte_lengths(backend, backend.get_vocab(with_added_tokens=False))
        try:
            self._init_tiktoken(spec)
        except Unsupported as exc:
            # Pieces still go through the piece cache, each miss as one HF call on that piece alone.
            check_piecewise(spec)
            self.kind, self.nfc, self.why_not_tiktoken = "HF per piece", False, str(exc)
            self._encode_ordinary = None

        first_pass: list[str] = []
        second_pass: list[str] = []
        added_ids: dict[str, int] = {}
        for idx, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word:
                raise Unsupported(f"added token {tok.content!r} has lstrip/rstrip/single_word")
            if not tok.content:
                raise Unsupported("empty added token")
            if tok.normalized and normalizer_kind(spec) != "identity":
                raise Unsupported("normalized added tokens under a non-identity normalizer")
            (second_pass if tok.normalized else first_pass).append(tok.content)
            added_ids[tok.content] = idx
        self._passes = [re.compile(f"({trie_regex(words).pattern})") for words in (first_pass, second_pass) if words]
        self._added_ids = added_ids

        self._next_id = backend.get_vocab_size(with_added_tokens=True)
        while backend.id_to_token(self._next_id) is not None:  # ids need not be dense
            self._next_id += 1
        self.pieces = _PieceCache()

        self.whole, self.why_not_whole = None, "turned off (BIOS_FASTOKENS=0)"
        if self.encode_with_offsets(PROBE_TEXT) != slow_encode_with_offsets(tokenizer, PROBE_TEXT):
            raise Unsupported("probe text encodes differently from HF")
        self.clear_cache()
        if whole_text.enabled() if whole is None else whole:
            self.whole, self.why_not_whole = self._whole_text_engine(tokenizer, spec)

    def _whole_text_engine(self, tokenizer: Any, spec: dict) -> tuple[whole_text.WholeTextEngine | None, str]:
        """The fastokens engine if it answers the probe texts exactly as HF does, else (None, why)."""
        try:
            engine = whole_text.WholeTextEngine(tokenizer, spec, self._nbytes)
            for text in (PROBE_TEXT, unicodedata.normalize("NFC", PROBE_TEXT)):
                if engine.encode_with_offsets(text) not in (None, slow_encode_with_offsets(tokenizer, text)):
                    raise Unsupported("fastokens encodes the probe text differently from HF")
            if engine.encode_with_offsets(unicodedata.normalize("NFC", PROBE_TEXT)) is None:
                raise Unsupported("fastokens declined the NFC probe text")
        except Exception as exc:  # noqa: BLE001 - Unsupported, or fastokens refusing the tokenizer.json: piece path
            return None, f"{type(exc).__name__}: {exc}" if not isinstance(exc, Unsupported) else str(exc)
        return engine, ""

    def _init_tiktoken(self, spec: dict) -> None:
        pattern, self.nfc = check_tiktoken(spec)
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        ranks = ranks_from_vocab(vocab)
        check_merges(vocab, model.get("merges") or [])
        if not model.get("ignore_merges"):
            check_whole_words(self._backend, vocab)
        if self.nfc:
            _bmp_unassigned()  # built now (0.1 s once per process) rather than on the first request
        self.kind = VERIFIED_PATTERNS[pattern]
        self._enc = tiktoken.Encoding(
            f"bios-fast-{self.kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
        self._encode_ordinary = self._enc._core_bpe.encode_ordinary  # the str check is check_text's job

    def describe(self) -> str:
        pieces = (
            f"tiktoken ({self.kind}{', NFC' if self.nfc else ''})"
            if self._encode_ordinary is not None
            else f"HF per piece (no tiktoken: {self.why_not_tiktoken})"
        )
        if self.whole is None:
            return f"fast: pieces by {pieces} + piece cache (no fastokens: {self.why_not_whole})"
        return f"fast: fastokens whole text; fallback pieces by {pieces} + piece cache"

    def describes(self, tokenizer: Any) -> bool:
        """Still true to `tokenizer`: same backend, no token added, special tokens still split out.

        (Replacing the backend's normalizer/pre-tokenizer in place is not detected; call `forget`.)
        """
        backend = tokenizer.backend_tokenizer
        return (
            backend is self._backend
            and backend.id_to_token(self._next_id) is None
            and not backend.encode_special_tokens
            and not getattr(tokenizer, "split_special_tokens", False)
        )

    def clear_cache(self) -> None:
        self.pieces.clear()

    # ---- one piece (text between added tokens) ----------------------------------------------------

    def _split(self, text: str) -> list[str]:
        """[piece, added token, piece, ..., piece]: `text` cut on the added tokens (pieces may be empty)."""
        if not self._passes:
            return [text]
        parts = self._passes[0].split(text)
        if len(self._passes) > 1:  # normalized added tokens: matched in what the first pass left
            again = self._passes[1].split
            out = []
            for k, part in enumerate(parts):
                if k % 2 or not part:
                    out.append(part)
                else:
                    out += again(part)
            parts = out
        return parts

    def _piece(self, piece: str) -> list:
        """[ids, byte starts + [total] or None until needed] of an ordinary piece (cached)."""
        entry = self.pieces.get(piece)
        if entry is None:
            if self._encode_ordinary is None or (self.nfc and not nfc_invariant(piece)):
                enc = self._backend.encode(piece, add_special_tokens=False)
                starts, char, byte = [], 0, 0
                for begin, _end in enc.offsets:  # char offsets -> byte offsets (begins never decrease)
                    if begin != char:
                        byte += len(piece[char:begin].encode("utf-8"))
                        char = begin
                    starts.append(byte)
                starts.append(byte + len(piece[char:].encode("utf-8")))
                entry = [list(enc.ids), starts]
            else:
                entry = [self._encode_ordinary(piece), None]
            self.pieces.put(piece, entry)
        return entry

    def _starts(self, entry: list) -> list[int]:
        if entry[1] is None:
            entry[1] = list(accumulate(map(self._nbytes.__getitem__, entry[0]), initial=0))
        return entry[1]

    def _count_before(self, entry: list, cut: int, total: int) -> int:
        """How many of the piece's tokens start before byte `cut` (0 < cut < total)."""
        if entry[1] is None:
            nbytes, ids = self._nbytes, entry[0]
            if cut <= WALK_BYTES:
                pos = k = 0
                for t in ids:
                    if pos >= cut:
                        return k
                    pos += nbytes[t]
                    k += 1
                return k
            if total - cut <= WALK_BYTES:
                pos, k = total, len(ids)
                for t in reversed(ids):
                    pos -= nbytes[t]
                    if pos < cut:
                        return k
                    k -= 1
                return k
        return bisect.bisect_left(self._starts(entry), cut)

    # ---- public -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.whole is not None and (found := self.whole.encode(text)) is not None:
            return found
        check_text(text)
        ids: list[int] = []
        special = False
        for part in self._split(text):
            if special:
                ids.append(self._added_ids[part])
            elif part:
                ids += self._piece(part)[0]
            special = not special
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start character of each token): HF's ids and `offset_mapping` begins."""
        if self.whole is not None and (found := self.whole.encode_with_offsets(text)) is not None:
            return found
        check_text(text)
        ids: list[int] = []
        begins: list[int] = []
        pos = 0
        special = False
        for part in self._split(text):
            if special:
                ids.append(self._added_ids[part])
                begins.append(pos)
            elif part:
                entry = self._piece(part)
                ids += entry[0]
                starts = self._starts(entry)[:-1]
                if part.isascii():
                    begins += [pos + s for s in starts]
                else:
                    char_of_byte = []
                    for k, ch in enumerate(part):
                        char_of_byte += [k] * len(ch.encode("utf-8"))
                    begins += [pos + char_of_byte[s] for s in starts]
            pos += len(part)
            special = not special
        return ids, begins

    def encode_segments(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """Ids of "".join(texts) and, per text, how many tokens have their first character in it."""
        if not texts:
            return [], []
        if self.whole is not None and (found := self.whole.encode_segments(texts)) is not None:
            return found
        text = "".join(texts)
        if not text.isascii():
            check_text(text)
        cuts = list(accumulate(map(len, texts)))  # cuts[s]: where texts[s] ends and texts[s + 1] starts
        n_cuts = len(cuts) - 1  # the last one is the end of the text: nothing to place
        cuts[-1] = len(text) + 1  # a sentinel no position reaches
        before: list[int] = []  # before[s]: tokens starting before cuts[s]
        place = before.append
        ids: list[int] = []
        added = self._added_ids
        pieces_get = self.pieces.get
        k = pos = 0
        nxt = cuts[0]
        special = False
        for part in self._split(text):
            end = pos + len(part)
            if nxt < end:  # a segment boundary before the end of this part
                while nxt <= pos:
                    place(len(ids))
                    k += 1
                    nxt = cuts[k]
                if special:
                    ids.append(added[part])
                    while nxt < end:
                        place(len(ids))
                        k += 1
                        nxt = cuts[k]
                else:  # boundaries inside a piece
                    entry = pieces_get(part) or self._piece(part)
                    base = len(ids)
                    if part.isascii():
                        while nxt < end:
                            place(base + self._count_before(entry, nxt - pos, end - pos))
                            k += 1
                            nxt = cuts[k]
                    else:
                        total = len(part.encode("utf-8"))
                        while nxt < end:
                            cut = len(part[: nxt - pos].encode("utf-8"))
                            place(base + self._count_before(entry, cut, total))
                            k += 1
                            nxt = cuts[k]
                    ids += entry[0]
            elif special:
                ids.append(added[part])
            elif part:
                ids += (pieces_get(part) or self._piece(part))[0]
            pos = end
            special = not special
        n = len(ids)
        before += [n] * (n_cuts - k)
        before.append(n)
        return ids, [b - a for a, b in zip([0, *before], before)]
