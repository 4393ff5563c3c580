"""Fast, exact tokenization with per-token offsets for rendering.

`tokenize_segments` needs token ids plus, per token, where its first character is. Calling the HF
tokenizer with `return_offsets_mapping=True` gives both but costs about as much as
`apply_chat_template` itself (most of it in the Oniguruma pre-tokenizer regex). This module reproduces
what the HF fast tokenizer does, step by step, with cheaper parts — and only where each step is
checked to be the same:

1. Added tokens. HF first cuts the text on its added tokens (leftmost-longest, an Aho-Corasick trie)
   and runs the model on each remaining piece on its own. We cut with a trie-shaped regex over the
   same token strings. Only tokenizers whose added tokens carry no `lstrip`/`rstrip`/`single_word`
   flags, and whose special tokens are matched (`encode_special_tokens=False`), are handled; added
   tokens with `normalized=True` only where the normalizer is the identity (then HF matches them in a
   second pass over the pieces the first pass left, which is what we do too).

2. Normalizer: none, or NFC. NFC is applied by HF per piece; a piece that NFC would change (or that
   holds code points this Python's Unicode database does not know, for which "unchanged" cannot be
   shown) is handed to the HF backend on its own — exact, since HF treats pieces independently — and
   everything else is provably unchanged by NFC, so offsets are untouched.

3. Pre-tokenizer + BPE: byte-level BPE split by one `Split(regex, isolated)`. The piece is encoded by a
   `tiktoken.Encoding` built from the tokenizer's own vocabulary (ranks = HF ids, bytes recovered via
   the byte-level unicode map) and the same regex. tiktoken merges any adjacent pair whose
   concatenation is a token, lowest id first; HF merges listed pairs, lowest merge index first. At
   construction we check they are the same procedure: the merge list is exactly the set of all splits
   of every token into two tokens, in non-decreasing order of the merged token's id (so pair priority
   agrees), and — where HF does not look whole words up in the vocabulary (`ignore_merges=False`) —
   every token's own bytes BPE back to that token (tiktoken always looks whole pieces up). The regex
   must be one whose fancy-regex (tiktoken) and Oniguruma (tokenizers) behaviour was verified for every
   code point (`VERIFIED_PATTERNS`); a probe string is compared with HF at construction as a last
   guard. Offsets come from the token byte lengths.

Anything else — SentencePiece/Metaspace tokenizers, several chained `Split`s (DeepSeek V3), merge
lists that are not tiktoken-complete, truncation/padding set on the backend, text with lone
surrogates — takes the exact slow path: one HF call with `return_offsets_mapping=True`.

Pieces between added tokens are cached (bounded LRU keyed by the piece text), so role headers,
separators and repeated system prompts / tool blocks cost one dictionary lookup.
"""

from __future__ import annotations

import bisect
import json
import re
import threading
import unicodedata
from collections import OrderedDict
from itertools import accumulate
from typing import Any, Sequence

# Pre-tokenization regexes (as written in tokenizer.json) for which tiktoken's fancy-regex and the
# tokenizers library's Oniguruma were checked to split identically for every Unicode scalar value in
# several contexts (tests/test_fast_tokenize.py re-checks the Basic Multilingual Plane each run).
VERIFIED_PATTERNS = {
    # Qwen2 / Qwen2.5 / Qwen3
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    # Llama 3 (cl100k-style)
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama3",
    # Mistral Tekken (Nemo)
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"""
    r"""[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+""":
        "tekken",
    # gpt-oss (o200k)
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "o200k",
}

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
    "CamelCaseWords HTTPServer iPhone O'Neil don't WE'LL\u200b\u200d\ufeff\x00\x7f\x1b[0m"
)

_BYTE_TO_CHAR: dict[int, str] | None = None
_UNASSIGNED_RE: re.Pattern | None = None
_ENCODERS: dict[int, tuple[Any, "FastEncoder | None", str]] = {}
_BUILD_LOCK = threading.Lock()

# Bounds of the per-tokenizer piece cache.
CACHE_MAX_ENTRIES = 16384
CACHE_MAX_TOKENS = 1 << 20  # ids kept in the cache in total
CACHE_MAX_PIECE_CHARS = 1 << 16


class Unsupported(Exception):
    """The tokenizer has a feature the fast path does not reproduce; the slow path is used."""


def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    global _BYTE_TO_CHAR
    if _BYTE_TO_CHAR is None:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        table = {b: chr(b) for b in printable}
        shift = 0
        for b in range(256):
            if b not in table:
                table[b] = chr(256 + shift)
                shift += 1
        _BYTE_TO_CHAR = table
    return _BYTE_TO_CHAR


def _unassigned_re() -> re.Pattern:
    """Code points unassigned in this Python's Unicode database (surrogates included)."""
    global _UNASSIGNED_RE
    if _UNASSIGNED_RE is None:
        ranges, start = [], None
        category = unicodedata.category
        for cp in range(0x80, 0x110001):
            bad = cp < 0x110000 and (category(chr(cp)) in ("Cn", "Cs"))
            if bad and start is None:
                start = cp
            elif not bad and start is not None:
                ranges.append((start, cp - 1))
                start = None
        body = "".join(
            re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges
        )
        _UNASSIGNED_RE = re.compile(f"[{body}]")
    return _UNASSIGNED_RE


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

    return re.compile(emit(trie), re.DOTALL)


class _PieceCache:
    """Bounded LRU: piece text -> (ids, byte starts + [total bytes])."""

    def __init__(self, max_entries: int = CACHE_MAX_ENTRIES, max_tokens: int = CACHE_MAX_TOKENS):
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._data: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def put(self, key: str, value: tuple[list[int], list[int]]) -> None:
        n = len(value[0])
        if len(key) > CACHE_MAX_PIECE_CHARS or n > self.max_tokens // 8:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self._tokens += n
            while len(self._data) > self.max_entries or self._tokens > self.max_tokens:
                _, (old_ids, _) = self._data.popitem(last=False)
                self._tokens -= len(old_ids)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._tokens = 0
            self.hits = self.misses = 0


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise Unsupported("not a tokenizers-backed (fast) tokenizer")
    return json.loads(backend.to_str())


def _check_pipeline(spec: dict) -> tuple[str, bool]:
    """(pre-tokenizer regex, applies NFC) for a supported pipeline; Unsupported otherwise."""
    if spec.get("truncation") or spec.get("padding"):
        raise Unsupported("truncation/padding configured on the backend")
    norm = spec.get("normalizer")
    if norm is None or (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        nfc = False
    elif norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and norm["normalizers"] == [{"type": "NFC"}]):
        nfc = True
    else:
        raise Unsupported(f"normalizer {norm.get('type')}")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if (
        not steps
        or len(steps) != 2
        or steps[0].get("type") != "Split"
        or "Regex" not in (steps[0].get("pattern") or {})
        or steps[0].get("behavior") != "Isolated"
        or steps[0].get("invert")
        or steps[1].get("type") != "ByteLevel"
        or steps[1].get("add_prefix_space")
        or steps[1].get("use_regex")
    ):
        raise Unsupported("pre-tokenizer is not one Split(regex, isolated) + ByteLevel(no prefix space, no regex)")
    pattern = steps[0]["pattern"]["Regex"]
    if pattern not in VERIFIED_PATTERNS:
        raise Unsupported("pre-tokenizer regex not among the verified patterns")
    post = spec.get("post_processor")
    procs = [] if post is None else post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in procs:
        kind = proc.get("type")
        if kind == "ByteLevel" and not proc.get("trim_offsets"):
            continue
        if kind == "TemplateProcessing":  # adds nothing with add_special_tokens=False
            continue
        raise Unsupported(f"post-processor {kind} (trim_offsets={proc.get('trim_offsets')})")
    model = spec.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        raise Unsupported("model is not plain byte-level BPE")
    return pattern, nfc


def _ranks_from_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
    to_byte = {c: b for b, c in byte_to_char().items()}
    ranks: dict[bytes, int] = {}
    try:
        for token, idx in vocab.items():
            ranks[bytes(to_byte[c] for c in token)] = idx
    except KeyError:
        raise Unsupported("vocabulary is not byte-level") from None
    if len(ranks) != len(vocab) or len(set(ranks.values())) != len(ranks):
        raise Unsupported("vocabulary byte strings or ids are not unique")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise Unsupported("vocabulary lacks some single bytes")
    return ranks


def _check_merges(vocab: dict[str, int], merges: list) -> None:
    """HF merges == tiktoken's implicit merges: every 2-split of every token, by merged id."""
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    seen = set()
    last = -1
    for left, right in pairs:
        merged = vocab.get(left + right)
        if merged is None or left not in vocab or right not in vocab:
            raise Unsupported("a merge does not produce a vocabulary token")
        if merged < last:
            raise Unsupported("merge order disagrees with token ids")
        last = merged
        seen.add((left, right))
    if len(seen) != len(pairs):
        raise Unsupported("duplicate merges")
    complete = 0
    for token in vocab:
        for k in range(1, len(token)):
            if token[:k] in vocab and token[k:] in vocab:
                complete += 1
    if complete != len(seen):  # seen ⊆ all splits, so equal size means equal sets
        raise Unsupported(f"merge list is not tiktoken-complete ({len(seen)} merges, {complete} splits)")


def _check_whole_words(backend: Any, vocab: dict[str, int]) -> None:
    """Without ignore_merges HF never looks a whole piece up; make sure BPE reaches every token anyway."""
    model = backend.model
    for token, idx in vocab.items():
        out = model.tokenize(token)
        if len(out) != 1 or out[0].id != idx:
            raise Unsupported(f"token {idx} is not reachable by its own merges")


class FastEncoder:
    """Exact `tokenizer(text, add_special_tokens=False)` ids with token start offsets, faster."""

    def __init__(self, tokenizer: Any):
        import tiktoken

        spec = _backend_json(tokenizer)
        pattern, self.nfc = _check_pipeline(spec)
        backend = tokenizer.backend_tokenizer
        if getattr(backend, "encode_special_tokens", False) or getattr(tokenizer, "split_special_tokens", False):
            raise Unsupported("special tokens are not split out (split_special_tokens=True)")
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        ranks = _ranks_from_vocab(vocab)
        _check_merges(vocab, model.get("merges") or [])
        if not model.get("ignore_merges"):
            _check_whole_words(backend, vocab)

        first_pass, second_pass, added_ids = [], [], {}
        for idx, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word:
                raise Unsupported(f"added token {tok.content!r} has lstrip/rstrip/single_word")
            if not tok.content:
                raise Unsupported("empty added token")
            if tok.normalized and self.nfc:
                raise Unsupported("normalized added tokens under a non-identity normalizer")
            (second_pass if tok.normalized else first_pass).append(tok.content)
            added_ids[tok.content] = idx
        self._passes = [trie_regex(words) for words in (first_pass, second_pass) if words]
        self._added_ids = added_ids

        self.kind = VERIFIED_PATTERNS[pattern]
        self._backend = backend
        self._enc = tiktoken.Encoding(
            f"bios-fast-{self.kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
        nbytes = [0] * (max(ranks.values()) + 1)
        for token_bytes, idx in ranks.items():
            nbytes[idx] = len(token_bytes)
        self._nbytes = nbytes
        self._fingerprint = self._current_fingerprint(tokenizer)
        self.cache = _PieceCache()

        ids, starts = self.encode_with_offsets(PROBE_TEXT)
        ref = slow_encode_with_offsets(tokenizer, PROBE_TEXT)
        if (ids, starts) != ref:
            raise Unsupported("probe text encodes differently from HF")
        self.cache.clear()

    @staticmethod
    def _current_fingerprint(tokenizer: Any) -> tuple:
        backend = tokenizer.backend_tokenizer
        return (
            id(backend),
            backend.get_vocab_size(with_added_tokens=True),
            bool(getattr(backend, "encode_special_tokens", False)),
            bool(getattr(tokenizer, "split_special_tokens", False)),
        )

    def matches(self, tokenizer: Any) -> bool:
        """Still describes `tokenizer` (no tokens added, special-token splitting unchanged)."""
        return self._current_fingerprint(tokenizer) == self._fingerprint

    # ---- pieces -------------------------------------------------------------------------------

    def _spans(self, text: str) -> list[tuple[int, int, int | None]]:
        """(start, end, added-token id or None for an ordinary piece), covering `text` in order."""
        spans: list[tuple[int, int, int | None]] = [(0, len(text), None)]
        for regex in self._passes:
            out = []
            for a, b, tid in spans:
                if tid is not None:
                    out.append((a, b, tid))
                    continue
                pos = a
                for m in regex.finditer(text, a, b):
                    s, e = m.span()
                    if s > pos:
                        out.append((pos, s, None))
                    out.append((s, e, self._added_ids[m.group()]))
                    pos = e
                if pos < b:
                    out.append((pos, b, None))
            spans = out
        return spans

    def encode_piece(self, piece: str) -> tuple[list[int], list[int]]:
        """An ordinary piece (no added tokens) -> (ids, byte offset of each token's start + [total])."""
        cached = self.cache.get(piece)
        if cached is not None:
            return cached
        if self.nfc and not piece.isascii() and (
            not unicodedata.is_normalized("NFC", piece) or _unassigned_re().search(piece)
        ):
            enc = self._backend.encode(piece, add_special_tokens=False)
            ids = list(enc.ids)
            starts = [len(piece[:begin].encode("utf-8")) for begin, _ in enc.offsets]
            starts.append(len(piece.encode("utf-8")))
        else:
            ids = self._enc.encode_ordinary(piece)
            starts = list(accumulate(map(self._nbytes.__getitem__, ids), initial=0))
        value = (ids, starts)
        self.cache.put(piece, value)
        return value

    # ---- public -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        ids: list[int] = []
        for a, b, tid in self._spans(text):
            if tid is None:
                ids += self.encode_piece(text[a:b])[0]
            else:
                ids.append(tid)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start character of each token) — HF's `offset_mapping` begins."""
        _check_text(text)
        ids: list[int] = []
        begins: list[int] = []
        for a, b, tid in self._spans(text):
            if tid is not None:
                ids.append(tid)
                begins.append(a)
                continue
            piece = text[a:b]
            piece_ids, starts = self.encode_piece(piece)
            ids += piece_ids
            if piece.isascii():
                begins += [a + s for s in starts[:-1]]
            else:
                char_of_byte = []
                for k, ch in enumerate(piece):
                    char_of_byte += [k] * len(ch.encode("utf-8"))
                begins += [a + char_of_byte[s] for s in starts[:-1]]
        return ids, begins

    def encode_segments(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """Tokenize "".join(texts) -> (ids, per text the number of tokens whose first char is in it)."""
        text = "".join(texts)
        _check_text(text)
        n_seg = len(texts)
        bounds = list(accumulate(map(len, texts), initial=0))  # bounds[s] = start of texts[s]
        before = [0] * (n_seg + 1)  # before[s] = tokens starting before bounds[s]
        ids: list[int] = []
        k = 0  # next boundary to resolve
        for a, b, tid in self._spans(text):
            while k < n_seg and bounds[k] <= a:
                before[k] = len(ids)
                k += 1
            if tid is not None:
                ids.append(tid)
                while k < n_seg and bounds[k] < b:
                    before[k] = len(ids)
                    k += 1
                continue
            piece = text[a:b]
            piece_ids, starts = self.encode_piece(piece)
            if k < n_seg and bounds[k] < b:
                base = len(ids)
                ascii_piece = piece.isascii()
                while k < n_seg and bounds[k] < b:
                    cut = bounds[k] - a if ascii_piece else len(piece[: bounds[k] - a].encode("utf-8"))
                    before[k] = base + bisect.bisect_left(starts, cut)
                    k += 1
            ids += piece_ids
        while k <= n_seg:
            before[k] = len(ids)
            k += 1
        return ids, [before[s + 1] - before[s] for s in range(n_seg)]


class _SlowPath(Exception):
    pass


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: whatever HF does with them, it does it
            raise _SlowPath from None


# ---- module API ---------------------------------------------------------------------------------


def get_fast_encoder(tokenizer: Any) -> FastEncoder | None:
    """The fast encoder of `tokenizer` (built once per tokenizer object), or None if unsupported."""
    entry = _ENCODERS.get(id(tokenizer))
    if entry is not None and entry[0] is tokenizer:
        encoder = entry[1]
        if encoder is None or encoder.matches(tokenizer):
            return encoder
    with _BUILD_LOCK:
        entry = _ENCODERS.get(id(tokenizer))
        if entry is not None and entry[0] is tokenizer and (entry[1] is None or entry[1].matches(tokenizer)):
            return entry[1]
        try:
            encoder, reason = FastEncoder(tokenizer), "fast"
        except Unsupported as exc:
            encoder, reason = None, f"slow path: {exc}"
        except Exception as exc:  # anything unexpected while inspecting: stay exact
            encoder, reason = None, f"slow path: {type(exc).__name__}: {exc}"
        # The tokenizer is kept alive with its entry, so its id cannot be reused by another object.
        _ENCODERS[id(tokenizer)] = (tokenizer, encoder, reason)
        return encoder


def fast_path_status(tokenizer: Any) -> str:
    """'fast (<regex kind>)' or 'slow path: <reason>' for `tokenizer`."""
    encoder = get_fast_encoder(tokenizer)
    if encoder is not None:
        return f"fast ({encoder.kind}{', NFC' if encoder.nfc else ''})"
    return _ENCODERS[id(tokenizer)][2]


def slow_encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [begin for begin, _ in enc["offset_mapping"]]


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Exactly `tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`'s ids and begins."""
    encoder = get_fast_encoder(tokenizer)
    if encoder is not None:
        try:
            return encoder.encode_with_offsets(text)
        except _SlowPath:
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
    encoder = get_fast_encoder(tokenizer)
    if encoder is not None:
        try:
            return encoder.encode_segments(texts)
        except _SlowPath:
            pass
    return slow_encode_segments(tokenizer, texts)
