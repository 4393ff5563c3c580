"""The offline-built Qwen3 tokenizer must behave exactly like HF Qwen/Qwen3-8B's."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from render_service import builtin_tokenizers
from render_service.builtin_tokenizers import (
    CHATML_TEMPLATE,
    build_qwen3_tokenizer,
    load_or_build_qwen3_tokenizer,
    qwen3_tokenizer,
)

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "Qwen--Qwen3-8B"

SPECIAL_STRINGS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<|fim_prefix|>",
    "<|vision_pad|>",
    "<tool_response>",
]

CORPUS = [
    "",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they've said we'll do it, isn't it? HE'S DONE. She'D go.",
    "def f(x):\n    return x + 1\n\n\tif x:\n\t\tpass\n",
    "class A:\n        def __init__(self):\n            self.x = {'a': [1, 2, 3]}\n",
    "    leading spaces",
    "trailing spaces    ",
    "a  b   c    d",
    " \t \t ",
    "\t\t\tx",
    "1234567",
    "3.14159 -42 1e10 0x1F 1,000,000",
    "２０２４年",
    "١٢٣٤",
    "你好，世界！这是一个测试。",
    "日本語のテキストです。",
    "한국어 텍스트",
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "😀 👍🏽 🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "👩🏽‍💻x👨‍🚀",
    "e\u0301 a\u0308 n\u0303 \u0928\u093f",
    "\u212b \u1100\u1161\u11a8 A\u030a \ufb01 \u2126",  # NFC composes/changes these
    "a\n\n\nb",
    "\n",
    "\n\n",
    "\r\n",
    "line1\r\nline2\r\n\r\n",
    "x \n y \n\n  z",
    "\u00a0\u2028\u3000 \x0b\x0c",
    "a<|im_end|>b",
    "<think>x</think>",
    "<|im_start|>user\nhi<|im_end|>\n",
    " <|endoftext|> ",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "<|im_start",
    "<|im_end|",
    "<think >",
    "!!!???...---",
    "@user #tag $5 %d ^_^ &amp; *bold* `code`",
    "https://example.com/path?q=1&r=2",
    "\x00\x01\x7f\ufffd",
    "ÿþ\u0080\u009f",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",
]

# Pools the random strings draw from: ASCII, awkward whitespace, combining marks,
# NFC-sensitive code points, CJK, Hangul jamo, emoji/ZWJ, and anything else.
CHAR_POOLS = [
    [chr(c) for c in range(0x20, 0x7F)],
    [" ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u2028", "\u3000", "  ", "\n\n"],
    [chr(c) for c in range(0x300, 0x370)],
    ["\u212b", "\u2126", "A", "e", "\u1100", "\u1161", "\u11a8", "\uac00", "\ufb01", "\u0344"],
    [chr(c) for c in range(0x4E00, 0x4F00)] + [chr(c) for c in range(0x3040, 0x30FF)],
    ["\U0001f600", "\U0001f44d", "\U0001f3fd", "\u200d", "\ufe0f", "\U0001f468", "\U0001f1ef", "\u2764"],
    SPECIAL_STRINGS,
    ["'s", "'LL", "123", "0", "é", "ß", "ﬁ", "\u0928\u093f", "\u0627\u0644"],
]


def random_texts(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.1:  # any scalar value, surrogates excluded
                code = rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
                pieces.append(chr(code))
            else:
                pieces.append(rng.choice(rng.choice(CHAR_POOLS)))
        texts.append("".join(pieces))
    return texts


@pytest.fixture(scope="module")
def fresh():
    return build_qwen3_tokenizer()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bios-cache")


@pytest.fixture(scope="module")
def from_cache(cache_root):
    """Build once into an empty cache, then load again purely from disk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOS_CACHE_DIR", str(cache_root))
        load_or_build_qwen3_tokenizer()

        def no_rebuild(*args, **kwargs):
            raise AssertionError("cache miss: tokenizer was rebuilt")

        mp.setattr(builtin_tokenizers, "build_qwen3_tokenizer", no_rebuild)
        return load_or_build_qwen3_tokenizer()


@pytest.fixture(scope="module")
def reference():
    if not (FIXTURE_DIR / "tokenizer.json").is_file():
        pytest.skip(f"reference Qwen3-8B tokenizer fixture not found at {FIXTURE_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE_DIR)


@pytest.fixture(scope="module", params=["fresh", "from_cache"])
def built(request):
    return request.getfixturevalue(request.param)


# ---- identical to the HF reference (skipped without the fixture) ----


def assert_same_encoding(tok, ref, texts):
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == ref.decode(ids), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), repr(text)


def test_corpus_matches_reference(built, reference):
    assert_same_encoding(built, reference, CORPUS)
    # Default add_special_tokens=True adds nothing for Qwen (no BOS).
    assert built.encode("hi there") == reference.encode("hi there")


def test_random_unicode_matches_reference(built, reference):
    assert_same_encoding(built, reference, random_texts(2000))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=60))
def test_hypothesis_text_matches_reference(reference, fresh, text):
    assert fresh.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_vocab_and_specials_match_reference(built, reference):
    assert built.vocab_size == reference.vocab_size == 151643
    assert len(built) == len(reference) == 151669
    assert built.get_vocab() == reference.get_vocab()
    assert built.all_special_tokens == reference.all_special_tokens
    assert built.all_special_ids == reference.all_special_ids
    assert built.extra_special_tokens == reference.extra_special_tokens
    for name in ("eos_token", "pad_token", "bos_token", "unk_token", "eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(built, name) == getattr(reference, name), name
    assert built.model_max_length == reference.model_max_length == 131072
    assert built.clean_up_tokenization_spaces is False


def test_added_token_flags_match_reference(built, reference):
    flags = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")

    def described(tok):
        return {i: tuple(getattr(t, f) for f in flags) for i, t in tok.added_tokens_decoder.items()}

    assert described(built) == described(reference)


# ---- no fixture needed ----


def test_known_ids(built):
    assert built.convert_tokens_to_ids("<|im_start|>") == 151644
    assert built.convert_tokens_to_ids("<|im_end|>") == 151645
    assert built.encode("<|im_start|>system\n", add_special_tokens=False) == [151644, 8948, 198]
    assert built.encode("<think>", add_special_tokens=False) == [151667]
    assert built.decode([151644, 8948, 198]) == "<|im_start|>system\n"


def test_disk_cache_equals_fresh_build(fresh, from_cache, cache_root):
    entries = list((cache_root / "tokenizers").iterdir())
    assert [e.name.startswith("qwen3-") for e in entries] == [True], entries  # no temp dirs left behind
    assert (entries[0] / "tokenizer.json").is_file()
    for text in ["Hello, world!", "a<|im_end|>b", "<think>x</think>", "你好 😀\r\n\n\n  x", "e\u0301"]:
        ids = fresh.encode(text, add_special_tokens=False)
        assert from_cache.encode(text, add_special_tokens=False) == ids
        assert from_cache.decode(ids) == fresh.decode(ids)
    assert len(from_cache) == len(fresh)
    assert from_cache.all_special_tokens == fresh.all_special_tokens
    assert from_cache.chat_template == CHATML_TEMPLATE


def test_qwen3_tokenizer_is_memoized(cache_root, monkeypatch):
    monkeypatch.setenv("BIOS_CACHE_DIR", str(cache_root))
    qwen3_tokenizer.cache_clear()
    try:
        assert qwen3_tokenizer() is qwen3_tokenizer()
    finally:
        qwen3_tokenizer.cache_clear()


def test_chatml_template(built):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = built.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = built.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
