"""fast_tokenize against the HF call it replaces: ids AND token starts (hence attribution) must be identical.

Both engines are checked: the whole-text fastokens path (the default) and the piece path (tiktoken or HF
per piece behind the piece cache) that takes over where fastokens is off or its guards say no.

Every fixture tokenizer (skipped without ../shared/fixtures) and the embedded Qwen3 tokenizer get: a large
seeded random corpus (emoji/ZWJ/flags, CJK, combining marks and other NFC-sensitive text, whitespace runs,
CRLF, digits, contractions, random code points from every plane, the tokenizer's own added-token strings
whole, partial and adjacent), a hypothesis search over segmentations, a sweep of every Basic Multilingual
Plane code point in several contexts, and periodic strings built from tokens with several BPE splits (where
tiktoken and HF could only disagree if they broke a tie differently).
"""

from __future__ import annotations

import random
import re

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from render_service.renderers import fast_tokenize as ft

# tokenizer -> the path it must take
EXPECTED = {
    "usf-mini": "tiktoken (qwen2, NFC)",
    "Qwen--Qwen2.5-7B-Instruct": "tiktoken (qwen2, NFC)",
    "Qwen--Qwen3-8B": "tiktoken (qwen2, NFC)",
    "meta-llama--Llama-3.1-8B-Instruct": "tiktoken (llama3)",
    "meta-llama--Llama-3.2-1B-Instruct": "tiktoken (llama3)",
    "mistralai--Mistral-Nemo-Instruct-2407": "tiktoken (tekken)",
    "openai--gpt-oss-20b": "tiktoken (o200k)",
    # merges are not tiktoken-complete and the pre-tokenizer chains three Splits: HF encodes each piece
    "deepseek-ai--DeepSeek-V3": "HF per piece",
}


def load(name: str):
    if name == "usf-mini":
        from render_service.tokenizers import get_tokenizer

        return get_tokenizer("ultrasafe/usf-mini")
    if not (FIXTURES / "tokenizers" / name).is_dir():
        pytest.skip(f"fixture tokenizer {name} not found under {FIXTURES}")
    from parity_cases import fixture_tokenizer

    return fixture_tokenizer(name)


@pytest.fixture(scope="module", params=list(EXPECTED))
def tok(request):
    tokenizer = load(request.param)
    assert EXPECTED[request.param] in ft.fast_path_status(tokenizer)
    return tokenizer


_PIECE_ENCODERS: dict[int, ft.FastEncoder] = {}


@pytest.fixture(params=["whole", "pieces"])
def encoder(request, tok):
    """The tokenizer's encoder with fastokens (as used) or without it (the piece path alone)."""
    if request.param == "whole":
        encoder = ft.get_fast_encoder(tok)
        assert encoder.whole is not None, ft.fast_path_status(tok)
        return encoder
    if id(tok) not in _PIECE_ENCODERS:
        _PIECE_ENCODERS[id(tok)] = ft.FastEncoder(tok, whole=False)
    return _PIECE_ENCODERS[id(tok)]


def added_strings(tok) -> list[str]:
    contents = sorted(t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values())
    rng = random.Random(7)
    picked = contents if len(contents) <= 40 else rng.sample(contents, 40)
    normalized = [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.normalized]
    return sorted(set(picked + normalized[:10]))


# ---- random text ---------------------------------------------------------------------------------------

WORDS = [
    "hello",
    "world",
    " the",
    " The",
    "ing",
    "tion",
    "banana",
    "ababab",
    "aaaa",
    "    ",
    "1234567",
    "ana",
    " ana",
    " 12",
    "don't",
    "I'M",
    "we'LL",
    "HTTPServer",
    "iPhone",
    "x" * 40,
    "=" * 30,
    "\t\t",
    "  \n  ",
]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n.,;:!?-_/\\\"'()[]{}<>|@#$%^&*+=~`")
UNICODE = [
    "\r\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "\u00a0",
    "\u2003",
    "\u3000",
    "\u2028",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\x00",
    "\x1b",
    "\x7f",
    "\u0301",
    "\u0300",
    "\u0308",
    "\u030a",
    "\u0327",
    "\u0323",
    "\u093c",
    "\u1100\u1161\u11a8",
    "e\u0301",
    "A\u030a",
    "\u212b",
    "\ufb01",
    "\u0958",
    "é",
    "ü",
    "ß",
    "ñ",
    "Å",
    "中",
    "文",
    "日本語",
    "한국어",
    "Ελληνικά",
    "Кириллица",
    "مرحبا",
    "שלום",
    "नमस्ते",
    "ไทย",
    "０１２",
    "½",
    "Ⅻ",
    "👍",
    "🏽",
    "👨\u200d👩\u200d👧",
    "🇺🇸",
    "❤️",
    "😀",
    "𝔘",
    "🤖",
    "\U000e0001",
    "\U0001f3fb",
]


def random_text(rng: random.Random, specials: list[str], max_len: int = 60) -> str:
    out = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.06 and specials:
            s = rng.choice(specials)
            out.append(s if rng.random() < 0.7 else s[: rng.randint(1, len(s))])  # partial ones too
        elif r < 0.09:
            out.append(chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x2FFFF)])))
        elif r < 0.11:
            out.append(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
        elif r < 0.30:
            out.append(rng.choice(WORDS))
        elif r < 0.45:
            out.append(rng.choice(UNICODE))
        else:
            out.append(rng.choice(CHARS))
    return "".join(out)


def random_cuts(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    segs = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for _ in range(rng.randint(0, 2)):
        segs.insert(rng.randint(0, len(segs)), "")
    return segs


def test_random_corpus(tok, encoder):
    specials = added_strings(tok)
    rng = random.Random(1234)
    whole_handled = 0
    for i in range(1500):
        text = random_text(rng, specials, max_len=rng.choice([10, 60, 200]))
        whole_handled += encoder.whole is not None and encoder.whole.encode(text) is not None
        want = ft.slow_encode_with_offsets(tok, text)
        assert encoder.encode_with_offsets(text) == want, repr(text)
        assert encoder.encode(text) == want[0]
        segs = random_cuts(rng, text)
        assert encoder.encode_segments(segs) == ft.slow_encode_segments(tok, segs), segs
        if i % 300 == 0:
            encoder.clear_cache()  # cold and warm piece cache alike
    if encoder.whole is not None:  # the engine under test really answered (not only its fallback)
        assert whole_handled > (300 if encoder.whole.nfc else 1400), whole_handled


def test_long_text_with_many_segments(tok, encoder):
    rng = random.Random(99)
    text = "".join(random_text(rng, added_strings(tok), 200) for _ in range(40))
    for _ in range(5):
        segs = random_cuts(rng, text) + [random_text(rng, [], 30) for _ in range(3)]
        rng.shuffle(segs)
        assert encoder.encode_segments(segs) == ft.slow_encode_segments(tok, segs)


segment_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_hypothesis_segments(tok, encoder, data):
    specials = added_strings(tok)
    part = st.one_of(segment_text, st.sampled_from(specials), st.sampled_from(["\r\n", "  ", "\n\n", " ", "e\u0301"]))
    segs = data.draw(st.lists(st.lists(part, max_size=4).map("".join), max_size=8))
    assert encoder.encode_segments(segs) == ft.slow_encode_segments(tok, segs)
    text = "".join(segs)
    assert encoder.encode_with_offsets(text) == ft.slow_encode_with_offsets(tok, text)


BMP = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
CONTEXTS = ["a{}b", " {}1", "\n{} x", "{}\u0301 ", "A{}{}"]


def test_every_bmp_code_point(tok, encoder):
    """Regex classes, NFC and byte offsets for each BMP character, in a few contexts, against HF."""
    for form in CONTEXTS:
        for lo in range(0, len(BMP), 4096):
            chars = BMP[lo : lo + 4096]
            text = "|".join(form.replace("{}", c) for c in chars)
            if encoder.encode_with_offsets(text) != ft.slow_encode_with_offsets(tok, text):
                bad = [
                    hex(ord(c))
                    for c in chars
                    if encoder.encode_with_offsets(form.replace("{}", c))
                    != ft.slow_encode_with_offsets(tok, form.replace("{}", c))
                ]
                pytest.fail(f"context {form!r}: characters {bad[:20]} (or their neighbours) differ")


def test_periodic_strings_of_multi_split_tokens(tok, encoder):
    """Where a token has several splits, HF breaks ties by merge index and tiktoken by position. Repeated and
    overlapping copies of such tokens are where that could show."""
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    decode = {c: b for b, c in ft.byte_to_char().items()}
    rng = random.Random(5)
    multi = []
    for token in rng.sample(sorted(vocab), 20000):
        if len(token) >= 3 and sum(token[:k] in vocab and token[k:] in vocab for k in range(1, len(token))) >= 2:
            try:
                multi.append(bytes(decode[c] for c in token).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                continue
    texts = []
    for t in multi[:1500]:
        texts += [t + t, t * 3, t + t[1:], t[1:] + t + t[:-1], " " + t + t]
    for lo in range(0, len(texts), 500):
        text = " | ".join(texts[lo : lo + 500])
        assert encoder.encode_with_offsets(text) == ft.slow_encode_with_offsets(tok, text)


def test_added_token_edges(tok, encoder):
    specials = added_strings(tok)
    cases = ["", " ", "\n", "x"]
    for s in specials[:12]:
        cases += [
            s,
            s + s,
            " " + s + " ",
            s[:-1],
            s[1:],
            s[:-1] + s,
            "a" + s + "b",
            s + "\u0301",
            "\n" + s + "\n\n",
            s + s[: len(s) // 2] + s,
        ]
    for text in cases:
        assert encoder.encode_with_offsets(text) == ft.slow_encode_with_offsets(tok, text), repr(text)


# ---- the pieces ----------------------------------------------------------------------------------------


def test_trie_regex_is_leftmost_longest():
    rng = random.Random(3)
    for _ in range(300):
        words = {"".join(rng.choice("ab<|>") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 8))}
        text = "".join(rng.choice("ab<|>x") for _ in range(40))
        got = [m.span() for m in ft.trie_regex(sorted(words)).finditer(text)]
        want, pos = [], 0
        while pos < len(text):
            hits = [len(w) for w in words if text.startswith(w, pos)]
            if hits:
                want.append((pos, pos + max(hits)))
                pos += max(hits)
            else:
                pos += 1
        assert got == want, (words, text)


def test_nfc_invariant():
    assert ft.nfc_invariant("plain ascii\r\n")
    assert ft.nfc_invariant("café 中文 👍🏽")
    assert not ft.nfc_invariant("cafe\u0301")
    assert not ft.nfc_invariant("\u212b")  # Angstrom sign -> Å
    assert not ft.nfc_invariant("a\u0378b")  # unassigned here: a newer Unicode might compose or reorder it
    assert not ft.nfc_invariant("a\U000e0080")


def test_piece_cache_is_bounded():
    cache = ft._PieceCache(max_entries=10, max_tokens=100)
    for i in range(50):
        cache.put(f"p{i}", [[1, 2, 3], None])
    assert len(cache) == 10 and cache.get("p49") is not None and cache.get("p0") is None
    cache.put("big", [list(range(90)), None])  # more than an eighth of the budget: not kept
    assert cache.get("big") is None


def test_lone_surrogates_take_the_slow_path():
    tok = load("usf-mini")
    text = "a\ud800b"
    try:
        want = ft.slow_encode_with_offsets(tok, text)
    except Exception as exc:  # whatever HF does, the fast path does the same
        with pytest.raises(type(exc)):
            ft.encode_with_offsets(tok, text)
        with pytest.raises(type(exc)):
            ft.encode_segments(tok, ["a", "\ud800", "b"])
    else:
        assert ft.encode_with_offsets(tok, text) == want


def tiny_tokenizer():
    """A small trained byte-level BPE (not tiktoken-complete: it takes the HF-per-piece path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def test_tokens_added_after_first_use_are_seen():
    tok = tiny_tokenizer()
    assert "HF per piece" in ft.fast_path_status(tok)
    text = "hello<new_tok>world<|end|> fox"
    assert ft.encode_with_offsets(tok, text) == ft.slow_encode_with_offsets(tok, text)
    tok.add_tokens(["<new_tok>"])
    assert ft.encode_with_offsets(tok, text) == ft.slow_encode_with_offsets(tok, text)
    assert tok.convert_tokens_to_ids("<new_tok>") in ft.encode_with_offsets(tok, text)[0]
    tok.add_special_tokens({"additional_special_tokens": ["<also|>"]})
    assert ft.encode_segments(tok, ["a<al", "so|>b"]) == ft.slow_encode_segments(tok, ["a<al", "so|>b"])


def test_fast_path_can_be_switched_off():
    tok = load("usf-mini")
    assert ft.get_fast_encoder(tok) is not None  # built (and probed) before we count slow calls
    calls = []
    original = ft.slow_encode_with_offsets
    ft.slow_encode_with_offsets = lambda t, s: calls.append(s) or original(t, s)
    try:
        with ft.fast_path_disabled():
            ft.encode_segments(tok, ["<|im_start|>user\n", "hi"])
        ft.encode_segments(tok, ["<|im_start|>user\n", "hi"])
    finally:
        ft.slow_encode_with_offsets = original
    assert calls == ["<|im_start|>user\nhi"]


# ---- through the renderers -----------------------------------------------------------------------------

FAMILY_FIXTURE = {
    "ultrasafe": "usf-mini",
    "qwen2.5": "Qwen--Qwen2.5-7B-Instruct",
    "qwen3": "Qwen--Qwen3-8B",
    "llama3.1": "meta-llama--Llama-3.1-8B-Instruct",
    "llama3.2": "meta-llama--Llama-3.2-1B-Instruct",
    "mistral-nemo": "mistralai--Mistral-Nemo-Instruct-2407",
    "gpt-oss": "openai--gpt-oss-20b",
    "deepseek-v3": "deepseek-ai--DeepSeek-V3",
}
FAMILY_OPTIONS = {
    "llama3.1": {"date_string": "26 Jul 2024"},
    "llama3.2": {"date_string": "26 Jul 2024"},
    "gpt-oss": {"current_date": "2025-01-15"},
}


@pytest.mark.parametrize("family", sorted(FAMILY_FIXTURE))
def test_render_is_unchanged_by_the_fast_path(family):
    from render_service.renderers import get_renderer, list_renderers

    if family not in {name for name, _, _ in list_renderers()}:
        pytest.skip(f"renderer {family} not registered")
    tok = load(FAMILY_FIXTURE[family])
    renderer = get_renderer(family, tok, **FAMILY_OPTIONS.get(family, {}))
    rng = random.Random(11)
    conversations = [
        [
            {"role": "system", "content": "Be terse. " + random_text(rng, [], 30)},
            {"role": "user", "content": random_text(rng, added_strings(tok)[:3], 80)},
            {"role": "assistant", "content": random_text(rng, [], 80)},
            {"role": "user", "content": "again: e\u0301 👍🏽 中文  \r\n x"},
            {"role": "assistant", "content": "done  \n"},
        ]
        for _ in range(8)
    ]
    for messages in conversations:
        for k in (2, 3, 5):
            try:
                with ft.fast_path_disabled():
                    want = renderer.render(messages[:k])
            except Exception:  # a conversation this family refuses is not this test's business
                continue
            assert renderer.render(messages[:k]) == want
            assert renderer.render(messages[:k]) == want  # warm piece cache


def test_status_strings(monkeypatch):
    tok = load("usf-mini")
    assert (
        ft.fast_path_status(tok) == "fast: fastokens whole text; fallback pieces by tiktoken (qwen2, NFC) + piece cache"
    )
    assert re.match(
        r"fast: pieces by tiktoken \(qwen2, NFC\) \+ piece cache \(no fastokens: turned off",
        ft.FastEncoder(tok, whole=False).describe(),
    )
    monkeypatch.setenv("BIOS_FASTOKENS", "0")
    assert ft.FastEncoder(tok).whole is None


def test_a_fastokens_failure_leaves_the_piece_path(monkeypatch):
    from render_service.renderers.fast_tokenize import whole_text

    def broken(*_args):
        raise RuntimeError("cannot read this tokenizer.json")

    monkeypatch.setattr(whole_text, "WholeTextEngine", broken)
    tok = load("usf-mini")
    encoder = ft.FastEncoder(tok)
    assert encoder.whole is None and "RuntimeError: cannot read" in encoder.describe()
    text = "<|im_start|>user\nhi there 👋<|im_end|>\n"
    assert encoder.encode_with_offsets(text) == ft.slow_encode_with_offsets(tok, text)


def test_whole_text_declines_what_it_cannot_place():
    """Text NFC would change (offsets would move) is left to the piece path, which still gets it right."""
    encoder = ft.get_fast_encoder(load("usf-mini"))
    for text in ["cafe\u0301 ok", "\u212b", "a\u0378b"]:
        assert encoder.whole.encode_with_offsets(text) is None
        assert encoder.encode_with_offsets(text) == ft.slow_encode_with_offsets(load("usf-mini"), text)
    assert encoder.whole.encode_segments(["<|im_start|>user\n", "café"]) is not None
    assert encoder.whole.encode_segments(["ok \ud800"]) is None  # a lone surrogate has no UTF-8 bytes to count
    for texts in (["", ""], ["", "a b", "", "<|im_end|>", ""], ["é", "", "日本"]):
        assert encoder.whole.encode_segments(texts) == ft.slow_encode_segments(load("usf-mini"), texts), texts
