"""`tokenizer_utils.get_tokenizer(name)`: the same name resolution as the train service."""

from render_service.tokenizers import get_tokenizer

__all__ = ["get_tokenizer"]
