"""Multi-turn bridge: extend a sampled turn's tokens with the next environment turn(s), without re-tokenizing them.

After sampling, the caller holds `prev_prompt_ids + prev_completion_ids`. For the next turn it needs those tokens
followed by the new messages (tool results, a user reply) and a fresh generation prompt. `bridge_to_next_turn`
keeps the earlier tokens verbatim and appends exactly the tokens a full re-render writes after the sampled turn,
or refuses (returns None and a reason) when the result would not equal that full re-render:

* the completion does not end with one of the renderer's stop tokens (truncated), or does not parse;
* the new messages contain an assistant message (only environment turns are bridged);
* the re-render of the history plus the parsed completion does not reproduce the previous tokens (the model
  sampled a non-canonical tokenization, or the template rewrites the turn once a later message exists, e.g.
  Qwen3 drops historical reasoning after a new user message);
* without `history`, the appended text depends on the history (checked with two different stand-in histories).

Attribution (seed 002): the earlier tokens get message_index -1, sampled False, is_content False; the appended
tokens keep the full render's attribution, with message indices into `new_messages` (the sampled turn's trailing
scaffolding, e.g. ChatML's newline after <|im_end|>, is -1 too).
"""

from __future__ import annotations

from typing import Sequence

from render_service.renderers.base import BaseRenderer, Message, RenderedTokens, RenderError

# Two stand-in histories: if the appended tokens differ between them, they depend on the real history.
_STAND_INS: tuple[list[Message], ...] = (
    [{"role": "user", "content": "Hello."}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Next question."},
    ],
)


def _suffix(
    renderer: BaseRenderer,
    history: Sequence[Message],
    sampled: Message,
    new_messages: Sequence[Message],
    tools,
    prev_prompt: list[int] | None,
    completion: list[int],
) -> tuple[RenderedTokens | None, str]:
    """Render history + sampled turn + new messages; check the sampled turn; return what follows it."""
    messages = [*history, sampled, *new_messages]
    try:
        full = renderer.render(messages, tools, add_generation_prompt=True)
    except RenderError as exc:
        return None, f"re-render failed: {exc}"
    turn = len(history)
    positions = [k for k, (i, s) in enumerate(zip(full.message_indices, full.sampled_mask)) if i == turn and s]
    if not positions:
        return None, "the renderer gives no attribution for the sampled turn, so its end cannot be located"
    end = positions[-1] + 1
    if full.token_ids[max(0, end - len(completion)) : end] != completion:
        return None, (
            "the re-render of the history does not reproduce the completion tokens (the template "
            "rewrites the sampled turn, e.g. drops its reasoning, or the sampled tokenization is "
            "not canonical)"
        )
    if prev_prompt is not None and full.token_ids[:end] != prev_prompt + completion:
        return None, "the re-render of the history does not reproduce prev_prompt_ids as a prefix"

    def relative(i: int) -> int:
        return i - turn - 1 if i > turn else -1

    suffix = RenderedTokens(
        token_ids=full.token_ids[end:],
        message_indices=[relative(i) for i in full.message_indices[end:]],
        message_roles=[r if i > turn else None for i, r in zip(full.message_indices[end:], full.message_roles[end:])],
        sampled_mask=full.sampled_mask[end:],
        is_content=[c and i > turn for i, c in zip(full.message_indices[end:], full.is_content[end:])],
    )
    return suffix, "ok"


def bridge_to_next_turn(
    renderer: BaseRenderer,
    prev_prompt_ids: Sequence[int],
    prev_completion_ids: Sequence[int],
    new_messages: Sequence[Message],
    tools: list[dict] | None = None,
    *,
    history: Sequence[Message] | None = None,
) -> tuple[RenderedTokens | None, str]:
    """(prev tokens + the next turn's tokens + generation prompt, "ok") or (None, why it cannot be exact).

    `history` is the message list `prev_prompt_ids` was rendered from; with it the bridge also checks that the
    full re-render reproduces `prev_prompt_ids`, so the result equals the full render's tokens exactly.
    """
    if hasattr(prev_prompt_ids, "to_ints"):  # a ModelInput from build_generation_prompt
        prev_prompt_ids = prev_prompt_ids.to_ints()
    prev_prompt, completion = [int(t) for t in prev_prompt_ids], [int(t) for t in prev_completion_ids]
    if not prev_prompt:
        return None, "prev_prompt_ids is empty"
    if not new_messages:
        return None, "new_messages is empty"
    if any(m.get("role") == "assistant" for m in new_messages):
        return None, "new_messages contains an assistant message: only environment turns are bridged"
    stops = set(renderer.get_stop_sequences())
    if not completion or completion[-1] not in stops:
        return None, "the completion did not end with a stop token (truncated or still generating)"
    sampled, ok = renderer.parse_response(completion, tools)
    if not ok:
        return None, "the completion does not parse as an assistant message"

    if history is not None:
        suffix, reason = _suffix(renderer, list(history), sampled, new_messages, tools, prev_prompt, completion)
    else:
        suffix, reason = None, "no stand-in history"
        for stand_in in _STAND_INS:
            candidate, reason = _suffix(renderer, stand_in, sampled, new_messages, tools, None, completion)
            if candidate is None:
                return None, reason
            if suffix is not None and candidate.token_ids != suffix.token_ids:
                return None, "the next turn's tokens depend on the earlier history: pass history= to bridge"
            suffix = candidate
    if suffix is None:
        return None, reason

    n = len(prev_prompt) + len(completion)
    return RenderedTokens(
        token_ids=prev_prompt + completion + suffix.token_ids,
        message_indices=[-1] * n + suffix.message_indices,
        message_roles=[None] * n + suffix.message_roles,
        sampled_mask=[False] * n + suffix.sampled_mask,
        is_content=[False] * n + suffix.is_content,
    ), "ok"
