"""Fast, exact tokenization with per-token offsets for rendering.

`tokenize_segments` needs the token ids of a rendered text plus, per token, which segment its first
character is in. One HF call with `return_offsets_mapping=True` gives both but costs about as much as
`apply_chat_template` itself (mostly the Oniguruma pre-tokenizer regex). This module redoes what the HF
fast tokenizer does, step by step, with cheaper parts, and only where each step is checked to be the same.
Anything it cannot show to be the same goes to the slow path (that one HF call).

1. Added tokens. HF first cuts the text on its added tokens (leftmost-longest, an Aho-Corasick trie) and
   runs normalizer, pre-tokenizer and model on each remaining piece on its own. We cut with a trie-shaped
   regex over the same strings. Supported: no `lstrip`/`rstrip`/`single_word` flags, special tokens
   matched (`encode_special_tokens=False`); `normalized=True` added tokens only under an identity
   normalizer (then, as in HF, they are matched in a second pass over what the first pass left).

2. Normalizer: none, or NFC. Under NFC a piece whose text NFC would change goes to the HF backend on its
   own (exact: HF treats pieces independently) with HF's offsets. "Unchanged" is decided by
   `unicodedata.is_normalized`, trusted only for text whose code points are all assigned in this
   Python's Unicode database (Unicode's normalization stability policy then guarantees a newer Unicode
   version agrees); text with other code points takes the HF route too. ASCII is always NFC.

3. Pre-tokenizer + BPE, for byte-level BPE with one `Split(regex, isolated)`: a `tiktoken.Encoding`
   built from the tokenizer's own vocabulary (rank = HF id; bytes recovered through the byte-level
   unicode map) with the same regex. tiktoken merges the adjacent pair whose concatenation is the
   lowest-id token; HF merges the listed pair with the lowest merge index. At construction we check that
   these are the same procedure: the merge list is exactly the set of all splits of every token into two
   tokens (so the same pairs are mergeable), in non-decreasing order of the merged token's id (so the
   same pair is chosen); and where HF does not look whole words up (`ignore_merges=False`) every token's
   own bytes BPE back to that token (tiktoken always looks a whole pre-token up first). One case is left
   open by these checks: two *different* splits of the same token adjacent at the same time, where HF
   picks by merge index and tiktoken by position. A step-by-step simulation found no such tie in ~250k
   distinct pre-tokens per vocabulary (a code corpus plus periodic strings built from 40k multi-split
   tokens), and the tests replay such strings against HF. The regex must be one of `VERIFIED_PATTERNS`,
   for which fancy-regex (tiktoken) and Oniguruma (tokenizers) were compared on every Unicode scalar
   value; a probe text is compared with HF at construction as a last guard.

   Tokenizers whose pipeline is piece-local but not tiktoken's (DeepSeek V3: three chained Splits and a
   merge list that is not tiktoken-complete) keep steps 1 and 4, and encode each uncached piece with one
   HF backend call on that piece alone, whose offsets are used as they are.

4. Pieces (the text between two added tokens) are cached, LRU and bounded, keyed by their text: role
   headers, separators, repeated system prompts and tool blocks cost a dictionary lookup.

Offsets come from the token byte lengths. Tokens spanning a segment boundary belong to the segment of
their first character, as in the slow path. Encoders are built once per tokenizer object (about a
second) and cached with the tokenizer kept alive.
"""

from __future__ import annotations

import bisect
import json
import re
import threading
import unicodedata
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from itertools import accumulate
from typing import Any, Sequence

# Pre-tokenization regexes (as written in tokenizer.json) for which tiktoken's fancy-regex and the
# tokenizers library's Oniguruma were checked to split identically for every Unicode scalar value in
# 15 contexts (tiktoken 0.14, tokenizers 0.23; tests/test_fast_tokenize.py re-checks the whole Basic
# Multilingual Plane on every run, so a library upgrade that changes a character class shows up there).
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
    "CamelCaseWords HTTPServer iPhone O'Neil don't WE'LL\u200b\u200d\ufeff\x00\x7f\x1b[0m \x1c \x85 x\u3000 y"
)

# Bounds of the per-tokenizer caches.
PIECE_CACHE_ENTRIES = 4096
PIECE_CACHE_TOKENS = 1 << 20  # ids held by the piece cache in total
PIECE_CACHE_MAX_CHARS = 1 << 15  # longer pieces are not cached
# Token starts inside a piece are found by walking token lengths when the boundary is this close (bytes)
# to the piece's start or end, else from the full prefix sums.
WALK_BYTES = 256

_BYTE_TO_CHAR: dict[int, str] | None = None
_BMP_UNASSIGNED: re.Pattern | None = None
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_ENCODERS: dict[int, tuple[Any, "FastEncoder | None", str]] = {}  # id -> (weakref, encoder, why)
_BUILD_LOCK = threading.Lock()
_ENABLED = True  # off only inside `fast_path_disabled()` (benchmarks measure the slow path with it)


class Unsupported(Exception):
    """The tokenizer has a feature the fast path does not reproduce; the slow path is used."""


class _SlowPath(Exception):
    """This text (lone surrogates) goes to the slow path."""


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


def _bmp_unassigned() -> re.Pattern:
    """A character class of the BMP code points this Python's Unicode database does not assign."""
    global _BMP_UNASSIGNED
    if _BMP_UNASSIGNED is None:
        ranges, start = [], None
        category = unicodedata.category
        for cp in range(0x80, 0x10001):
            bad = cp < 0x10000 and category(chr(cp)) in ("Cn", "Cs")
            if bad and start is None:
                start = cp
            elif not bad and start is not None:
                ranges.append((start, cp - 1))
                start = None
        body = "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges)
        _BMP_UNASSIGNED = re.compile(f"[{body}]")  # all below U+10000: sre makes it a bitmap
    return _BMP_UNASSIGNED


def nfc_invariant(text: str) -> bool:
    """True if NFC provably leaves `text` unchanged, in this Python's Unicode version and any later one."""
    if text.isascii():
        return True
    if not unicodedata.is_normalized("NFC", text) or _bmp_unassigned().search(text):
        return False
    if _ASTRAL.search(text):
        category = unicodedata.category
        return not any(category(ch) == "Cn" for ch in set(_ASTRAL.findall(text)))
    return True


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


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise Unsupported("not a tokenizers-backed (fast) tokenizer")
    return json.loads(backend.to_str())


def _normalizer_kind(spec: dict) -> str:
    norm = spec.get("normalizer")
    if norm is None or (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return "identity"
    if norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and norm["normalizers"] == [{"type": "NFC"}]):
        return "NFC"
    return str(norm.get("type"))


def _pre_tokenizer_steps(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre] if pre else []


def _check_common(spec: dict) -> None:
    """What both fast paths need: the HF call is one backend encode whose offsets are not trimmed."""
    if spec.get("truncation") or spec.get("padding"):
        raise Unsupported("truncation/padding configured on the backend")
    post = spec.get("post_processor")
    procs = [] if post is None else post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in procs:
        kind = proc.get("type")
        if kind == "ByteLevel" and not proc.get("trim_offsets"):
            continue
        if kind == "TemplateProcessing":  # adds nothing with add_special_tokens=False
            continue
        raise Unsupported(f"post-processor {kind} (trim_offsets={proc.get('trim_offsets')})")


def _check_tiktoken(spec: dict) -> tuple[str, bool]:
    """(pre-tokenizer regex, applies NFC) if tiktoken can stand in for normalizer + pre-tokenizer + BPE."""
    normalizer = _normalizer_kind(spec)
    if normalizer not in ("identity", "NFC"):
        raise Unsupported(f"normalizer {normalizer}")
    steps = _pre_tokenizer_steps(spec)
    if (
        len(steps) != 2
        or steps[0].get("type") != "Split"
        or "Regex" not in (steps[0].get("pattern") or {})
        or steps[0].get("behavior") != "Isolated"
        or steps[0].get("invert")
        or steps[1].get("type") != "ByteLevel"
        or steps[1].get("add_prefix_space")
        or steps[1].get("use_regex")
    ):
        raise Unsupported("pre-tokenizer is not one Split(regex) + ByteLevel")
    pattern = steps[0]["pattern"]["Regex"]
    if pattern not in VERIFIED_PATTERNS:
        raise Unsupported("pre-tokenizer regex not among the verified patterns")
    model = spec.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        raise Unsupported("model is not plain byte-level BPE")
    return pattern, normalizer == "NFC"


def _check_piecewise(spec: dict) -> None:
    """HF encodes each piece between added tokens on its own, so a piece's tokens do not depend on the
    rest of the text. True of normalizers and of these pre-tokenizers; not of e.g. Metaspace with
    prepend_scheme="first" (only the first piece gets the prefix), so anything else is refused."""
    for step in _pre_tokenizer_steps(spec):
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            continue
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            continue
        if kind == "Digits":
            continue
        raise Unsupported(f"pre-tokenizer step {kind} not known to be piece-local")
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("model") or {}).get("dropout"):
        raise Unsupported("model is not BPE without dropout")


def _ranks_from_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
    table = str.maketrans({c: chr(b) for b, c in byte_to_char().items()})
    ranks: dict[bytes, int] = {}
    try:
        for token, idx in vocab.items():  # byte-level chars -> chr(byte) -> the byte
            ranks[token.translate(table).encode("latin-1")] = idx
    except UnicodeEncodeError:
        raise Unsupported("vocabulary is not byte-level") from None
    if any(c not in byte_to_char().values() for c in set("".join(vocab))):
        raise Unsupported("vocabulary is not byte-level")
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
    has = vocab.__contains__
    complete = 0
    for token in vocab:
        for k in range(1, len(token)):
            if has(token[:k]) and has(token[k:]):
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
    """Exact `tokenizer(text, add_special_tokens=False)` ids and token starts, without the HF call."""

    def __init__(self, tokenizer: Any):
        spec = _backend_json(tokenizer)
        _check_common(spec)
        backend = tokenizer.backend_tokenizer
        if getattr(backend, "encode_special_tokens", False) or getattr(tokenizer, "split_special_tokens", False):
            raise Unsupported("special tokens are not split out (split_special_tokens=True)")
        self._backend = backend
        try:
            self._init_tiktoken(spec)
        except Unsupported as exc:
            # Pieces still go through the piece cache, each miss as one HF call on that piece alone.
            _check_piecewise(spec)
            self.kind, self.nfc, self.why_not_tiktoken = "HF per piece", False, str(exc)
            self._encode_ordinary = None
            self._nbytes = []

        first_pass, second_pass, added_ids = [], [], {}
        for idx, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word:
                raise Unsupported(f"added token {tok.content!r} has lstrip/rstrip/single_word")
            if not tok.content:
                raise Unsupported("empty added token")
            if tok.normalized and _normalizer_kind(spec) != "identity":
                raise Unsupported("normalized added tokens under a non-identity normalizer")
            (second_pass if tok.normalized else first_pass).append(tok.content)
            added_ids[tok.content] = idx
        self._passes = [re.compile(f"({trie_regex(words).pattern})") for words in (first_pass, second_pass) if words]
        self._added_ids = added_ids

        self._next_id = backend.get_vocab_size(with_added_tokens=True)
        while backend.id_to_token(self._next_id) is not None:  # ids need not be dense
            self._next_id += 1
        self.pieces = _PieceCache()

        ids, starts = self.encode_with_offsets(PROBE_TEXT)
        if (ids, starts) != slow_encode_with_offsets(tokenizer, PROBE_TEXT):
            raise Unsupported("probe text encodes differently from HF")
        self.clear_cache()

    def _init_tiktoken(self, spec: dict) -> None:
        import tiktoken

        pattern, self.nfc = _check_tiktoken(spec)
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        ranks = _ranks_from_vocab(vocab)
        _check_merges(vocab, model.get("merges") or [])
        if not model.get("ignore_merges"):
            _check_whole_words(self._backend, vocab)
        if self.nfc:
            _bmp_unassigned()  # built now (0.1 s once per process) rather than on the first request
        self.kind = VERIFIED_PATTERNS[pattern]
        self._enc = tiktoken.Encoding(f"bios-fast-{self.kind}", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={})
        self._encode_ordinary = self._enc._core_bpe.encode_ordinary  # the str check is _check_text's job
        nbytes = [0] * (max(ranks.values()) + 1)
        for token_bytes, idx in ranks.items():
            nbytes[idx] = len(token_bytes)
        self._nbytes = nbytes

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
        _check_text(text)
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
        _check_text(text)
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
        text = "".join(texts)
        if not text.isascii():
            _check_text(text)
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


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: whatever HF does with them, it does it
            raise _SlowPath from None


# ---- module API ---------------------------------------------------------------------------------


def _cached(tokenizer: Any) -> tuple | None:
    entry = _ENCODERS.get(id(tokenizer))
    if entry is not None and entry[0]() is tokenizer and (entry[1] is None or entry[1].describes(tokenizer)):
        return entry
    return None


def get_fast_encoder(tokenizer: Any) -> FastEncoder | None:
    """The fast encoder of `tokenizer` (built on first use, 1-2 s), or None if unsupported."""
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
        except Exception as exc:  # anything unexpected while inspecting: stay exact
            encoder, reason = None, f"slow path: {type(exc).__name__}: {exc}"
        key = id(tokenizer)
        try:  # the entry goes when the tokenizer does (before its id can be reused)
            ref = weakref.ref(tokenizer, lambda _ref, key=key: _ENCODERS.pop(key, None))
        except TypeError:  # not weakly referenceable: keep it alive instead
            ref = (lambda kept: lambda: kept)(tokenizer)
        _ENCODERS[key] = (ref, encoder, reason)
        return encoder


def forget(tokenizer: Any) -> None:
    """Drop the cached encoder of `tokenizer` (after changing it in place in a way not detected)."""
    with _BUILD_LOCK:
        _ENCODERS.pop(id(tokenizer), None)


def fast_path_status(tokenizer: Any) -> str:
    """'fast (<pattern>[, NFC])' or 'slow path: <reason>' for `tokenizer`."""
    encoder = get_fast_encoder(tokenizer)
    if encoder is None:
        return _ENCODERS[id(tokenizer)][2]
    if encoder._encode_ordinary is None:
        return f"piece cache + HF per piece (no tiktoken: {encoder.why_not_tiktoken})"
    return f"fast: tiktoken ({encoder.kind}{', NFC' if encoder.nfc else ''}) + piece cache"


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


def slow_encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [begin for begin, _ in enc["offset_mapping"]]


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Exactly `tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`'s ids and begins."""
    encoder = get_fast_encoder(tokenizer) if _ENABLED else None
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
    encoder = get_fast_encoder(tokenizer) if _ENABLED else None
    if encoder is not None:
        try:
            return encoder.encode_segments(texts)
        except _SlowPath:
            pass
    return slow_encode_segments(tokenizer, texts)
