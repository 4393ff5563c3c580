"""RenderedTokens: token ids with per-token attribution (seed 002). Shared by the render library and the client."""

from __future__ import annotations

from itertools import groupby
from typing import Iterable, NamedTuple, Sequence

from bios.types import ModelInput


class AttributionRun(NamedTuple):
    """Consecutive tokens that share one attribution."""

    length: int
    message_index: int  # -1: template scaffolding outside any message
    role: str | None  # the message's role; None on scaffolding
    sampled: bool  # the model emits these tokens when it writes the message
    is_content: bool  # message-body bytes, not template scaffold


def _canonical(runs: Iterable[AttributionRun]) -> list[AttributionRun]:
    """Maximal runs: empty ones dropped, equal neighbours joined (so equal attributions compare equal)."""
    out: list[AttributionRun] = []
    for run in runs:
        if run.length <= 0:
            continue
        if out and out[-1][1:] == run[1:]:
            out[-1] = out[-1]._replace(length=out[-1].length + run.length)
        else:
            out.append(AttributionRun(*run))
    return out


def _per_token_field(k: int, doc: str) -> property:
    def get(self: "RenderedTokens") -> list:
        return self._per_token()[k]

    def set_(self: "RenderedTokens", value: list) -> None:
        lists = list(self._per_token())
        lists[k] = value
        self._lists = (lists[0], lists[1], lists[2], lists[3])

    return property(get, set_, doc=doc)


class RenderedTokens:
    """Token ids and, for each token, which message it came from and how.

    A renderer produces the attribution as runs (a conversation has tens of runs and thousands of tokens);
    the per-token lists are built from them the first time one is read, and from then on are the truth
    (they may be edited in place). `runs` works from either form.
    """

    __slots__ = ("token_ids", "_runs", "_lists")

    def __init__(
        self,
        token_ids: list[int],
        message_indices: list[int],
        message_roles: list[str | None],
        sampled_mask: list[bool],
        is_content: list[bool],
    ):
        self.token_ids = token_ids
        self._runs: list[AttributionRun] | None = None
        self._lists: tuple[list, list, list, list] | None = (message_indices, message_roles, sampled_mask, is_content)

    @classmethod
    def from_runs(
        cls, token_ids: list[int], runs: Iterable[AttributionRun], canonical: bool = False
    ) -> "RenderedTokens":
        """`canonical=True`: the caller built maximal runs (no empty ones, no equal neighbours)."""
        self = cls.__new__(cls)
        self.token_ids = token_ids
        self._runs = runs if canonical and isinstance(runs, list) else _canonical(runs)
        self._lists = None
        if sum(run.length for run in self._runs) != len(token_ids):
            raise ValueError(
                f"attribution runs cover {sum(r.length for r in self._runs)} tokens, not the {len(token_ids)} token ids"
            )
        return self

    message_indices = _per_token_field(0, "per token: index of its message, -1 on scaffolding")
    message_roles = _per_token_field(1, "per token: its message's role, None on scaffolding")
    sampled_mask = _per_token_field(2, "per token: would the model emit it")
    is_content = _per_token_field(3, "per token: message-body bytes rather than template scaffold")

    def _per_token(self) -> tuple[list, list, list, list]:
        if self._lists is None:
            assert self._runs is not None  # one of the two forms is always held
            indices: list[int] = []
            roles: list[str | None] = []
            sampled: list[bool] = []
            content: list[bool] = []
            for n, index, role, s, c in self._runs:
                indices += [index] * n
                roles += [role] * n
                sampled += [s] * n
                content += [c] * n
            self._lists, self._runs = (indices, roles, sampled, content), None
        return self._lists

    @property
    def runs(self) -> list[AttributionRun]:
        """The attribution as maximal runs of consecutive tokens that share it."""
        if self._runs is not None:
            return list(self._runs)
        assert self._lists is not None  # one of the two forms is always held
        rows = zip(*self._lists)
        return [AttributionRun(len(list(group)), *key) for key, group in groupby(rows)]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RenderedTokens):
            return NotImplemented
        return self.token_ids == other.token_ids and self.runs == other.runs

    def __repr__(self) -> str:
        return (
            f"RenderedTokens(token_ids={self.token_ids!r}, message_indices={self.message_indices!r}, "
            f"message_roles={self.message_roles!r}, sampled_mask={self.sampled_mask!r}, "
            f"is_content={self.is_content!r})"
        )

    def to_model_input(self) -> ModelInput:
        return ModelInput.from_ints(self.token_ids)

    def per_token(self, run_values: Sequence[float]) -> list[float]:
        """One value per run (e.g. a loss weight) -> one per token."""
        out: list[float] = []
        for run, value in zip(self.runs, run_values, strict=True):
            out += [value] * run.length
        return out

    def content_token_spans_by_role(self) -> dict[str, list[tuple[int, int]]]:
        """Contiguous runs of body tokens, [start, end) per run, grouped by message role."""
        spans: dict[str, list[tuple[int, int]]] = {}
        start = end = 0
        last: tuple[int, str | None] | None = None  # (message, role) of the open span
        for run in self.runs:
            start, end = end, end + run.length
            if run.is_content and last is not None and last[0] == run.message_index:
                spans[last[1] or ""][-1] = (spans[last[1] or ""][-1][0], end)  # same message: one span
                continue
            last = (run.message_index, run.role) if run.is_content else None
            if run.is_content:
                spans.setdefault(run.role or "", []).append((start, end))
        return spans

    def content_mask_for_roles(self, roles: Iterable[str]) -> list[bool]:
        wanted = set(roles)
        mask: list[bool] = []
        for run in self.runs:
            mask += [run.is_content and run.role in wanted] * run.length
        return mask
