"""Show which tokens carry loss weight: ANSI colours for a terminal, or HTML."""

from __future__ import annotations

import html
from itertools import groupby
from typing import Any, Sequence

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def _runs(tokens: Sequence[int], weights: Sequence[float], tokenizer: Any):
    """(weighted?, decoded text) for each run of tokens on the same side of the prompt/completion cut."""
    tokens, weights = list(tokens), list(weights)
    if len(tokens) != len(weights):
        raise ValueError(f"weights: length {len(weights)} differs from tokens length {len(tokens)}")
    pairs = list(zip(tokens, weights))
    for weighted, run in groupby(pairs, key=lambda p: p[1] > 0):
        yield weighted, tokenizer.decode([t for t, _ in run])


def format_colorized(tokens: Sequence[int], weights: Sequence[float], tokenizer: Any) -> str:
    """Prompt tokens (weight 0) green, completion tokens (weight > 0) red; newlines shown as ↵."""
    out = []
    for weighted, text in _runs(tokens, weights, tokenizer):
        out.append((RED if weighted else GREEN) + text.replace("\n", "↵\n") + RESET)
    return "".join(out)


def format_html(tokens: Sequence[int], weights: Sequence[float], tokenizer: Any) -> str:
    spans = []
    for weighted, text in _runs(tokens, weights, tokenizer):
        colour = "#c0392b" if weighted else "#27ae60"
        spans.append(f'<span style="color:{colour}">{html.escape(text)}</span>')
    return '<pre class="bios-tokens">' + "".join(spans) + "</pre>"
