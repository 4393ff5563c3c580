"""The generic renderer (`chat_template`/`default`): any HF tokenizer's own chat template, with attribution.

The template is opaque Jinja, so the text is always the template's own output (ids == apply_chat_template,
always) and only the attribution is recovered:

1. Sentinels. Every message field (content and its text parts, reasoning_content/thinking, tool-call names and
   string arguments) is wrapped in a unique pair of private-use-area characters and the template is rendered
   once. With the markers removed the text must equal the plain render, and every marker pair must come out
   whole; then the first occurrence of each pair is where that field's bytes landed. A template that rewrites a
   field (`|trim`, `.strip('\\n')`, `if content` on an empty string) breaks this check; such a message is retried
   alone with markers around its stripped core ("markers_stripped"), then with the prefix-diff method
   ("prefix_diff": the text render(messages[:i+1]) adds to render(messages[:i]), with the content found by
   string search), and as a last resort gets no attribution ("none": scaffolding only).
2. Structure. The generation prompt GP = render(gen=True) minus render(gen=False) gives the assistant header;
   its leading special token (e.g. `<|im_start|>`) opens every header, and the special token right before each
   header opener, plus the tokenizer's eos, are the end-of-turn tokens. An assistant samples from the end of its
   header (the last GP occurrence before its body, or failing that the exact end of
   render(messages[:i], add_generation_prompt=True)) up to and including the first end-of-turn token after its
   body; headers, separators, tool wrappers and the generation prompt are scaffolding.

Typed special-token text inside content is tokenized as the special token, exactly as HF does.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, text_of
from render_service.renderers.registry import register_renderer

MARKERS, MARKERS_STRIPPED, PREFIX_DIFF, NONE = "markers", "markers_stripped", "prefix_diff", "none"
_MARK_FIRST, _MARK_LAST = 0xF0000, 0xFFFFD  # Supplementary Private Use Area-A
_MARK_RE = re.compile("[\U000f0000-\U000ffffd]")


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    message: int


def _apply(tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict) -> str:
    if not getattr(tokenizer, "chat_template", None) and not options.get("chat_template"):
        raise RenderError("renderer: this tokenizer has no chat template; name a renderer explicitly")
    try:
        return tokenizer.apply_chat_template(
            list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **options
        )
    except Exception as exc:  # the template is opaque: raise_exception, TypeError on `+`, undefined fields...
        raise RenderError(f"chat template: cannot render this conversation: {exc}") from exc


_SPECIALS: dict[int, tuple[Any, tuple[str, ...]]] = {}  # id -> (tokenizer, its special tokens, longest first)


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    cached = _SPECIALS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        found = {t.content for t in decoder.values() if getattr(t, "special", False)}
        found |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        if len(_SPECIALS) > 32:
            _SPECIALS.clear()
        cached = _SPECIALS[id(tokenizer)] = (tokenizer, tuple(sorted(found, key=len, reverse=True)))
    return cached[1]


class _Marks:
    """Allocates a fresh (open, close) character pair per marked field."""

    def __init__(self) -> None:
        self.next = _MARK_FIRST
        self.fields: dict[str, tuple[int, str]] = {}  # open char -> (message index, close char)

    def wrap(self, text: str, message: int, strip: bool) -> str:
        core = text.strip() if strip else text
        if (strip and not core) or self.next + 1 > _MARK_LAST:
            return text
        opener, closer = chr(self.next), chr(self.next + 1)
        self.next += 2
        self.fields[opener] = (message, closer)
        if not strip:
            return opener + text + closer
        lead = text[: len(text) - len(text.lstrip())]
        return lead + opener + core + closer + text[len(lead) + len(core) :]


def _marked_message(message: Message, index: int, strip: bool, marks: _Marks) -> Message:
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str):  # an empty string is marked too (unstripped): it still pins the position
        out["content"] = marks.wrap(content, index, strip)
    elif isinstance(content, list):
        out["content"] = [
            {**p, "text": marks.wrap(p["text"], index, strip)}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    for key in ("reasoning_content", "thinking"):
        if isinstance(message.get(key), str) and message[key]:
            out[key] = marks.wrap(message[key], index, strip)
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            call = dict(call)
            fn = call.get("function")
            if isinstance(fn, dict):
                fn = dict(fn)
                if isinstance(fn.get("name"), str) and fn["name"]:
                    fn["name"] = marks.wrap(fn["name"], index, False)
                if isinstance(fn.get("arguments"), str) and fn["arguments"]:
                    fn["arguments"] = marks.wrap(fn["arguments"], index, strip)
                call["function"] = fn
            calls.append(call)
        out["tool_calls"] = calls
    return out


class _Context:
    """One conversation under one template: plain renders (cached) and the template's turn structure."""

    def __init__(self, tokenizer, messages, tools, add_generation_prompt: bool, options: dict):
        self.tokenizer, self.messages, self.tools, self.options = tokenizer, list(messages), tools, options
        self.add_generation_prompt = add_generation_prompt
        self._cache: dict[tuple[int, bool], str | None] = {}
        self.text = _apply(tokenizer, self.messages, tools, add_generation_prompt, options)
        self._cache[(len(self.messages), add_generation_prompt)] = self.text
        self.specials = tuple(t for t in _special_tokens(tokenizer) if t in self.text)
        bos = getattr(tokenizer, "bos_token", None)
        self.floor = len(bos) if bos and self.text.startswith(bos) else 0
        self.gp = self._generation_prompt()
        self.opener = self._leading_special(self.gp.lstrip())  # e.g. <|im_start|>: every header starts with it
        self.gp_candidates = self._gp_candidates()
        self.eot = self._end_of_turn_tokens()

    def render(self, k: int, gen: bool) -> str | None:
        """Plain render of messages[:k]; None when the template cannot render that prefix."""
        if (k, gen) not in self._cache:
            try:
                self._cache[(k, gen)] = _apply(self.tokenizer, self.messages[:k], self.tools, gen, self.options)
            except RenderError:
                self._cache[(k, gen)] = None
        return self._cache[(k, gen)]

    def _generation_prompt(self) -> str:
        last_assistant = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=0)
        for k in dict.fromkeys((len(self.messages), last_assistant)):
            gen, plain = (self.render(k, True), self.render(k, False)) if k else (None, None)
            if gen is not None and plain is not None and gen.startswith(plain):
                return gen[len(plain) :]
        return ""

    def _leading_special(self, text: str) -> str | None:
        return next((t for t in _special_tokens(self.tokenizer) if text.startswith(t)), None)

    def _gp_candidates(self) -> list[str]:
        """GP and its shorter prefixes cut after a newline or special token, down to the header opener."""
        if not self.gp or not self.opener:
            return [self.gp] if self.gp else []
        cuts = {len(self.gp)} | {i + 1 for i, ch in enumerate(self.gp) if ch == "\n"}
        for tok in _special_tokens(self.tokenizer):
            at = self.gp.find(tok)
            while at >= 0:
                cuts.add(at + len(tok))
                at = self.gp.find(tok, at + 1)
        low = self.gp.find(self.opener) + len(self.opener)
        return [self.gp[:c] for c in sorted(cuts, reverse=True) if c >= low]

    def _end_of_turn_tokens(self) -> set[str]:
        eot = {self.tokenizer.eos_token} if getattr(self.tokenizer, "eos_token", None) else set()
        if not self.opener:
            return eot
        bos = getattr(self.tokenizer, "bos_token", None)
        for text in (self.text, self.render(len(self.messages), not self.add_generation_prompt)):
            text = text or ""
            at = text.find(self.opener)
            while at >= 0:
                before = text[max(0, at - 256) : at].rstrip()
                tok = next((t for t in self.specials if before.endswith(t)), None)
                if tok and tok not in (bos, self.opener):
                    eot.add(tok)
                at = text.find(self.opener, at + 1)
        return eot

    def find_eot(self, start: int, end: int) -> int | None:
        """End of the first end-of-turn token in text[start:end]."""
        best: tuple[int, int] | None = None
        for tok in self.eot:
            at = self.text.find(tok, start, end)
            if at >= 0 and (best is None or (at, -len(tok)) < best):
                best = (at, -len(tok))
        return best[0] - best[1] if best else None

    def assistant_header(self, i: int, start: int, body: int) -> tuple[int, int, bool]:
        """(header start, sampling start, found) for assistant i whose header lies in text[start:body]."""
        for cand in self.gp_candidates:
            at = self.text.rfind(cand, start, body)
            if at >= 0:
                return at, at + len(cand), True
        exact = self.render(i, True) if i else None
        if exact is not None and self.text.startswith(exact) and start <= len(exact) <= body:
            return len(exact), len(exact), True  # the gap before belongs to the previous turn (e.g. [/INST])
        return start, body, False

    def header_start(self, start: int, body: int) -> int:
        at = self.text.rfind(self.opener, start, body) if self.opener else -1
        return at if at >= 0 else start


def _marked_spans(ctx: _Context, levels: dict[int, str]) -> dict[int, list[_Span]] | None:
    """Render once with markers on the messages in `levels`; None unless the marker-free text is the plain text."""
    marks = _Marks()
    msgs = [
        _marked_message(m, i, levels[i] == MARKERS_STRIPPED, marks) if i in levels else m
        for i, m in enumerate(ctx.messages)
    ]
    try:
        marked = _apply(ctx.tokenizer, msgs, ctx.tools, ctx.add_generation_prompt, ctx.options)
    except RenderError:
        return None
    if _MARK_RE.sub("", marked) != ctx.text:
        return None
    where: dict[str, list[int]] = {}
    for removed, hit in enumerate(_MARK_RE.finditer(marked)):
        where.setdefault(hit.group(), []).append(hit.start() - removed)
    spans: dict[int, list[_Span]] = {i: [] for i in levels}
    for opener, (index, closer) in marks.fields.items():
        opens, closes = where.get(opener, []), where.get(closer, [])
        if not opens and not closes:
            continue  # the template does not render this field (e.g. dropped historical reasoning)
        if len(opens) != len(closes) or closes[0] < opens[0]:
            return None  # the field was cut or split: positions would be meaningless
        spans[index].append(_Span(opens[0], closes[0], index))
    return spans


def _may_be_stripped(m: Message) -> bool:
    """Fields with outer whitespace, or empty content beside tool calls (`if message.content` templates)."""
    parts = [m.get("content")] if not isinstance(m.get("content"), list) else [p.get("text") for p in m["content"]]
    parts += [m.get("reasoning_content"), m.get("thinking")]
    parts += [(c.get("function") or {}).get("arguments") for c in m.get("tool_calls") or []]
    stripped = any(isinstance(p, str) and p != p.strip() for p in parts)
    return stripped or (not m.get("content") and bool(m.get("tool_calls")))


def _choose_levels(ctx: _Context) -> tuple[dict[int, str], dict[int, list[_Span]]]:
    """The best marker level per message whose combined render still reproduces the plain text."""
    n = len(ctx.messages)
    if _MARK_RE.search(ctx.text):
        return {}, {}
    levels = {i: MARKERS for i in range(n)}
    spans = _marked_spans(ctx, levels)
    if spans is None:  # second guess, one render: the usual rewrites are stripping and `if content`
        levels = {i: MARKERS_STRIPPED if _may_be_stripped(m) else MARKERS for i, m in enumerate(ctx.messages)}
        spans = _marked_spans(ctx, levels)
    if spans is None:  # find each message's level alone (n renders)
        levels = {}
        for i in range(n):
            level = next((lv for lv in (MARKERS, MARKERS_STRIPPED) if _marked_spans(ctx, {i: lv}) is not None), None)
            if level:
                levels[i] = level
        spans = _marked_spans(ctx, levels)
        if spans is None:  # fields interact across messages: add them one at a time
            kept: dict[int, str] = {}
            for i, level in levels.items():
                if _marked_spans(ctx, {**kept, i: level}) is not None:
                    kept[i] = level
            levels, spans = kept, _marked_spans(ctx, kept) or {}
    keep = {i: lv for i, lv in levels.items() if spans.get(i)}
    return keep, {i: spans[i] for i in keep}


def _find_once(text: str, needle: str, start: int, end: int) -> int | None:
    at = text.find(needle, start, end)
    return at if needle and at >= 0 and text.find(needle, at + 1, end) < 0 else None


def _prefix_diff(ctx: _Context, i: int) -> tuple[tuple[int, int], list[_Span]] | None:
    """Region render(messages[:i+1]) adds to render(messages[:i]), and the fields found in it by search."""
    before = ctx.render(i, False) if i else ctx.text[: ctx.floor]
    after = ctx.render(i + 1, False)
    if after is None or before is None or not ctx.text.startswith(after) or not after.startswith(before):
        return None
    lo, hi = len(before), len(after)
    m = ctx.messages[i]
    fields = [text_of(m.get("content")), m.get("reasoning_content") or "", m.get("thinking") or ""]
    fields += [(c.get("function") or {}).get("name") or "" for c in m.get("tool_calls") or []]
    spans = []
    for field in fields:
        if not isinstance(field, str) or not field:
            continue
        for needle in (field, field.strip(), json.dumps(field, ensure_ascii=False)[1:-1]):
            at = _find_once(ctx.text, needle, lo, hi)
            if at is not None:
                spans.append(_Span(at, at + len(needle), i))
                break
    return (lo, hi), spans


def _longest_increasing(anchors: dict[int, int]) -> list[int]:
    """The most messages whose anchors increase with their index; the others are embedded elsewhere."""
    order = sorted(anchors)
    if all(anchors[a] <= anchors[b] for a, b in zip(order, order[1:])):
        return order  # the usual case: messages appear in order
    best: dict[int, list[int]] = {}
    for i in order:
        prev = [best[j] for j in order if j < i and anchors[j] <= anchors[i]]
        best[i] = max(prev, key=len, default=[]) + [i]
    return max(best.values(), key=len, default=[])


def attribute(
    tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict
) -> tuple[list[Segment], list[str]]:
    """Segments of the template's text, and the attribution method used per message."""
    ctx = _Context(tokenizer, messages, tools, add_generation_prompt, options)
    text, n = ctx.text, len(ctx.messages)
    levels, spans = _choose_levels(ctx)
    methods = [levels.get(i, NONE) for i in range(n)]
    regions: dict[int, tuple[int, int]] = {}
    for i in range(n):
        if i not in levels and (found := _prefix_diff(ctx, i)) is not None:
            regions[i], spans[i] = found
            methods[i] = PREFIX_DIFF if found[1] else NONE

    anchors = {
        i: regions[i][0] if i in regions else min(s.start for s in spans[i])
        for i in range(n)
        if i in regions or spans.get(i)
    }
    main = _longest_increasing(anchors)
    trailer = len(text)  # where the generation prompt starts
    if ctx.add_generation_prompt:
        plain = ctx.render(n, False)
        if plain is not None and text.startswith(plain):
            trailer = len(plain)
        elif ctx.gp and text.endswith(ctx.gp):  # the template also rewrites the last turn (gpt-oss <|return|>)
            trailer = len(text) - len(ctx.gp)

    # Walk the messages in text order: each one's header starts after the previous one's owned text ends.
    starts: list[int] = []
    overlays: list[tuple[int, int, Segment]] = []
    prev_end = ctx.floor
    for k, i in enumerate(main):
        limit = anchors[main[k + 1]] if k + 1 < len(main) else max(trailer, prev_end)
        own = [s for s in spans.get(i, []) if s.start < limit] or spans.get(i, [])
        body_lo = min((s.start for s in own), default=None)
        body_hi = max((s.end for s in own), default=None)
        if i in regions:
            start, limit = max(regions[i][0], prev_end), regions[i][1]
        if ctx.messages[i]["role"] != "assistant":
            overlays += [(s.start, s.end, Segment("", i, is_content=True)) for s in own]
            if i in regions:
                prev_end = limit
            else:  # anchored by its own spans, so `own` is not empty
                assert body_lo is not None and body_hi is not None
                start = ctx.header_start(prev_end, body_lo)
                prev_end = body_hi
        else:  # (body_lo and body_hi are None exactly when `own` is empty)
            lo = prev_end if i not in regions else start
            head, sample, reliable = ctx.assistant_header(i, lo, body_lo if body_lo is not None else limit)
            if i not in regions:
                start = head
            eot = ctx.find_eot(body_hi if body_hi is not None else sample, limit)
            end = eot if eot is not None else (body_hi if body_hi is not None else sample)
            if sample < end and (own or (reliable and eot is not None)):
                overlays.append((sample, end, Segment("", i, is_content=True, sampled=True)))
                methods[i] = methods[i] if methods[i] != NONE else PREFIX_DIFF
            prev_end = limit if i in regions else max(end, start)
        starts.append(start)
    for i in set(anchors) - set(main):  # bodies a template moves into another turn (e.g. a system prompt)
        role = ctx.messages[i]["role"]
        overlays += [(s.start, s.end, Segment("", i, True, role == "assistant")) for s in spans.get(i, [])]
    trailer = max(trailer, prev_end)

    base = [(0, starts[0] if starts else trailer, Segment(""))]
    base += [(s, e, Segment("", i)) for i, s, e in zip(main, starts, starts[1:] + [trailer])]
    base.append((trailer, len(text), Segment("")))
    return _paint(text, base, overlays), methods


def _paint(text: str, base, overlays) -> list[Segment]:
    """Cut `text` into segments: overlays (non-overlapping, first wins) over a covering base layout."""
    chosen: list[tuple[int, int, Segment]] = []
    for s, e, seg in sorted(overlays, key=lambda o: (o[0], o[1])):
        if s < e and (not chosen or s >= chosen[-1][1]):
            chosen.append((s, e, seg))
    cuts = sorted({0, len(text)} | {p for s, e, _ in base + chosen for p in (s, e) if 0 <= p <= len(text)})
    base_starts = [s for s, _, _ in base]
    over_starts = [s for s, _, _ in chosen]
    out: list[Segment] = []
    for a, b in zip(cuts, cuts[1:]):
        k = bisect.bisect_right(over_starts, a) - 1
        if k >= 0 and chosen[k][0] <= a < chosen[k][1]:
            seg = chosen[k][2]
        else:
            seg = base[max(0, bisect.bisect_right(base_starts, a) - 1)][2]
        if out and (out[-1].message_index, out[-1].is_content, out[-1].sampled) == (
            seg.message_index,
            seg.is_content,
            seg.sampled,
        ):
            out[-1] = Segment(out[-1].text + text[a:b], seg.message_index, seg.is_content, seg.sampled)
        else:
            out.append(Segment(text[a:b], seg.message_index, seg.is_content, seg.sampled))
    return out


def chat_template_segments(
    tokenizer: Any, messages: Sequence[Message], tools, add_generation_prompt: bool, options: dict
) -> list[Segment]:
    return attribute(tokenizer, messages, tools, add_generation_prompt, options)[0]


def attribution_methods(
    tokenizer: Any, messages: Sequence[Message], tools=None, add_generation_prompt: bool = False, **options: Any
) -> list[str]:
    """Per message: 'markers', 'markers_stripped', 'prefix_diff' or 'none' (for reports and tests)."""
    return attribute(tokenizer, messages, tools, add_generation_prompt, options)[1]


def detected_stop_tokens(tokenizer: Any, **options: Any) -> list[int]:
    """Token ids that end an assistant turn under this template: eos plus the turn-end token found before each
    header (e.g. Llama <|eot_id|>, gpt-oss <|end|>), from a probe conversation. For get_stop_sequences()."""
    probe = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    ctx = _Context(tokenizer, probe, None, True, options)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ctx.eot}
    return sorted(i for i in ids if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None))


# apply_chat_template's own parameters: an option of the same name would collide with them.
_RESERVED_OPTIONS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


class ChatTemplateRenderer(BaseRenderer):
    """The tokenizer's own chat template, rendered as is, with attribution recovered from it (above), so any HF
    tokenizer with a template works."""

    name = "chat_template"

    def __init__(self, tokenizer: Any, **options: Any):
        self._stop_ids: list[int] | None = None
        super().__init__(tokenizer, **options)

    def _check_options(self) -> None:
        """Its options are the variables the template mentions, plus `chat_template` itself."""
        template = self.options.get("chat_template") or getattr(self.tokenizer, "chat_template", None) or ""
        source = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
        for key in self.options:
            if key in _RESERVED_OPTIONS:
                raise RenderError(f"renderer.options.{key}: reserved (set by the renderer itself)")
            if key != "chat_template" and not re.search(rf"\b{re.escape(key)}\b", source):
                raise RenderError(f"renderer.options.{key}: the chat template does not read this variable")

    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        return chat_template_segments(self.tokenizer, messages, tools, add_generation_prompt, self.options)

    def get_stop_sequences(self) -> list[int]:
        """Token ids that end an assistant turn: eos plus the template's own turn-end token."""
        if self._stop_ids is None:  # found once per renderer: detection renders a probe chat
            if getattr(self.tokenizer, "chat_template", None):
                self._stop_ids = detected_stop_tokens(self.tokenizer, **self.options)
            else:
                eos = self.tokenizer.eos_token_id
                self._stop_ids = [eos] if eos is not None else []
        return list(self._stop_ids)


register_renderer(
    "chat_template",
    ChatTemplateRenderer,
    aliases=("default",),
    description="any HF tokenizer's own chat template, with attribution recovered from it",
)
