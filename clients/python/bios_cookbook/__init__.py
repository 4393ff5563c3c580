"""bios_cookbook: renderers, tokenizers and helpers for building training data (runs in-process)."""
