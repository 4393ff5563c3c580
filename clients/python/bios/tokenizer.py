"""A model's tokenizer, from the files the train service sends (GetTokenizer).

With transformers installed (the full install) this is `AutoTokenizer` over those files, the same object a
local load gives. The light client has no transformers: it gets `ServedTokenizer`, the same `tokenizer.json`
on Hugging Face's `tokenizers` library (what transformers' fast tokenizers run on, so the ids are the same),
with the special tokens of `tokenizer_config.json` and the chat template as an attribute.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


def load(directory: Path) -> Any:
    """The tokenizer saved in `directory`: transformers' when installed, else a ServedTokenizer."""
    if importlib.util.find_spec("transformers") is not None:
        # Found by name: the light client has no transformers (and must not need it to import).
        return importlib.import_module("transformers").AutoTokenizer.from_pretrained(str(directory))
    return ServedTokenizer(directory)


class ServedTokenizer:
    """encode / decode and the special tokens, as transformers' fast tokenizer of the same files has them."""

    def __init__(self, directory: Path):
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template = directory / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.exists() else config.get("chat_template")
        self.name_or_path = str(directory)
        self.model_max_length = config.get("model_max_length")
        for role in ("bos", "eos", "pad", "unk"):
            token = config.get(f"{role}_token")
            if isinstance(token, dict):  # an AddedToken, serialized
                token = token.get("content")
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_token_id", self._tokenizer.token_to_id(token) if token else None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as transformers counts it)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"ServedTokenizer({self.name_or_path!r}, {len(self)} tokens)"
