"""What the fast paths need of a tokenizer, read from its tokenizer.json, and why tiktoken is exact.

Each check raises `Unsupported` with the reason; the caller then takes a slower exact path.

tiktoken stands in for normalizer + pre-tokenizer + BPE only for byte-level BPE with one
`Split(regex, isolated)`: a `tiktoken.Encoding` built from the tokenizer's own vocabulary (rank = HF id;
bytes recovered through the byte-level unicode map) with the same regex. tiktoken merges the adjacent pair
whose concatenation is the lowest-id token; HF merges the listed pair with the lowest merge index. These
checks show they are the same procedure: the merge list is exactly the set of all splits of every token
into two tokens (so the same pairs are mergeable), in non-decreasing order of the merged token's id (so
the same pair is chosen); and where HF does not look whole words up (`ignore_merges=False`) every token's
own bytes BPE back to that token (tiktoken always looks a whole pre-token up first). One case is left
open: two *different* splits of the same token adjacent at the same time, where HF picks by merge index
and tiktoken by position. A step-by-step simulation found no such tie in ~250k distinct pre-tokens per
vocabulary (a code corpus plus periodic strings built from 40k multi-split tokens), and the tests replay
such strings against HF. The regex must be one of `VERIFIED_PATTERNS`, for which fancy-regex (tiktoken)
and Oniguruma (tokenizers) were compared on every Unicode scalar value.
"""

from __future__ import annotations

import json
from typing import Any

# Pre-tokenization regexes (as written in tokenizer.json) for which tiktoken's fancy-regex and the
# tokenizers library's Oniguruma were checked to split identically for every Unicode scalar value in
# 15 contexts (tiktoken 0.14, tokenizers 0.23; tests/test_fast_tokenize.py re-checks the whole Basic
# Multilingual Plane on every run, so a library upgrade that changes a character class shows up there).
VERIFIED_PATTERNS = {
    # Qwen2 / Qwen2.5 / Qwen3
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",  # noqa: E501 - the exact regex
    # Llama 3 (cl100k-style)
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama3",  # noqa: E501 - the exact regex
    # Mistral Tekken (Nemo)
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"""
    r"""[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+""": "tekken",
    # gpt-oss (o200k)
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "o200k",
}

_BYTE_TO_CHAR: dict[int, str] | None = None


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


def backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise Unsupported("not a tokenizers-backed (fast) tokenizer")
    return json.loads(backend.to_str())


def normalizer_kind(spec: dict) -> str:
    norm = spec.get("normalizer")
    if norm is None or (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return "identity"
    if norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and norm["normalizers"] == [{"type": "NFC"}]):
        return "NFC"
    return str(norm.get("type"))


def pre_tokenizer_steps(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre] if pre else []


def check_common(spec: dict) -> None:
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


def check_tiktoken(spec: dict) -> tuple[str, bool]:
    """(pre-tokenizer regex, applies NFC) if tiktoken can stand in for normalizer + pre-tokenizer + BPE."""
    normalizer = normalizer_kind(spec)
    if normalizer not in ("identity", "NFC"):
        raise Unsupported(f"normalizer {normalizer}")
    steps = pre_tokenizer_steps(spec)
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


def check_piecewise(spec: dict) -> None:
    """HF encodes each piece between added tokens on its own, so a piece's tokens do not depend on the
    rest of the text. True of normalizers and of these pre-tokenizers; not of e.g. Metaspace with
    prepend_scheme="first" (only the first piece gets the prefix), so anything else is refused."""
    for step in pre_tokenizer_steps(spec):
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


def ranks_from_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
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


def check_merges(vocab: dict[str, int], merges: list) -> None:
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


def check_whole_words(backend: Any, vocab: dict[str, int]) -> None:
    """Without ignore_merges HF never looks a whole piece up; make sure BPE reaches every token anyway."""
    model = backend.model
    for token, idx in vocab.items():
        out = model.tokenize(token)
        if len(out) != 1 or out[0].id != idx:
            raise Unsupported(f"token {idx} is not reachable by its own merges")


def token_byte_lengths(backend: Any, vocab: dict[str, int]) -> list[int]:
    """Byte length of every token id as the model emits it: byte-level vocabulary entries decoded through
    the byte map, added tokens by their content. Entries that are not byte-level (a BPE over byte-level
    input never produces them) get a huge length, so a byte-count check on their use fails loudly."""
    decode = {c: b for b, c in byte_to_char().items()}
    added = backend.get_added_tokens_decoder()
    size = max([*vocab.values(), *added, -1]) + 1
    lengths = [1 << 40] * size
    for token, idx in vocab.items():
        if all(c in decode for c in token):
            lengths[idx] = len(token)  # one byte-level character per byte
    for idx, tok in added.items():
        lengths[idx] = len(tok.content.encode("utf-8"))
    return lengths
