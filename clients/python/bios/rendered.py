"""RenderedTokens: token ids with per-token attribution (seed 002). Shared by the render library and the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from bios.types import ModelInput


@dataclass
class RenderedTokens:
    token_ids: list[int]
    message_indices: list[int]
    message_roles: list[str | None]  # per token; None on scaffolding
    sampled_mask: list[bool]
    is_content: list[bool]

    def __len__(self) -> int:
        return len(self.token_ids)

    def to_model_input(self) -> ModelInput:
        return ModelInput.from_ints(self.token_ids)

    def content_token_spans_by_role(self) -> dict[str, list[tuple[int, int]]]:
        """Contiguous runs of body tokens, [start, end) per run, grouped by message role."""
        spans: dict[str, list[tuple[int, int]]] = {}
        start = None
        for k in range(len(self.token_ids) + 1):
            inside = k < len(self.token_ids) and self.is_content[k]
            same_run = (
                start is not None
                and inside
                and self.message_indices[k] == self.message_indices[start]
            )
            if start is not None and not same_run:
                spans.setdefault(self.message_roles[start] or "", []).append((start, k))
                start = None
            if inside and start is None:
                start = k
        return spans

    def content_mask_for_roles(self, roles: Iterable[str]) -> list[bool]:
        wanted = set(roles)
        return [c and r in wanted for c, r in zip(self.is_content, self.message_roles)]
