"""Declarative conversation templates (seed 003): a chat format written as data, rendered with full attribution.

The template format (a `ConversationTemplate`: one formatter of `TemplateComponent`s per role) and its
validation are in declarative_schema.py; this module renders it.

Attribution: placeholder substitutions are message body (is_content). In the assistant formatter everything up to
the first placeholder is the header, i.e. the generation prompt (scaffolding); from there on the text of
components with `mask: true` (the default) is what the model samples, up to and including the stop token (the
first special token written after the first placeholder, else eos, unless `stop_tokens` names them); text after
the stop token and `mask: false` components are scaffolding. `special_stopper` is sampled when it ends an
assistant turn whose formatter wrote no stop token.

Load one with `ConversationTemplate.from_file(path)` (JSON, or YAML when PyYAML is installed) and render it with
`get_renderer("declarative", tokenizer, template=path_or_template)` (a bare name such as "chatml" means the
bundled render_service/templates/<name>.json). Text is tokenized in one pass, so typed
special-token text inside content becomes the special token, as HF chat templates do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from render_service.renderers.base import BaseRenderer, Message, RenderError, Segment, text_of
from render_service.renderers.declarative_schema import (
    PLACEHOLDER_RE,
    PLACEHOLDERS,
    BaseFormatter,
    ConversationTemplate,
    ListFormatter,
    StringFormatter,
    TemplateComponent,
)
from render_service.renderers.registry import register_renderer

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"  # bundled templates, e.g. chatml.json


class _Piece:
    """A run of formatter output: literal text, or a substituted field (`body`)."""

    __slots__ = ("text", "body", "mask")

    def __init__(self, text: str, body: bool, mask: bool):
        self.text, self.body, self.mask = text, body, mask


class DeclarativeRenderer(BaseRenderer):
    """A chat format given as a ConversationTemplate (JSON/YAML file or object)."""

    name = "declarative"
    option_names = ()

    def __init__(self, tokenizer: Any, template: ConversationTemplate | str | Path | dict | None = None, **options):
        super().__init__(tokenizer, **options)
        if template is None:
            raise RenderError("declarative: pass template=<ConversationTemplate, dict or path to a JSON/YAML file>")
        if isinstance(template, (str, Path)):
            bundled = TEMPLATES_DIR / f"{template}.json"
            path = bundled if not Path(template).exists() and bundled.is_file() else template
            template = ConversationTemplate.from_file(path)
        elif isinstance(template, dict):
            template = ConversationTemplate.from_data(template)
        self.template: ConversationTemplate = template
        self._stop_strings = self._find_stop_strings()

    # ---- component text ---------------------------------------------------------------------------------------

    def _token_text(self, component: TemplateComponent) -> str:
        tok = self.tokenizer
        if component.type == "token":
            name = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}.get(component.text, component.text)
            if not name:
                raise RenderError(f"template: component {component.content!r}: this tokenizer has none")
            ids = [tok.convert_tokens_to_ids(name)]
        else:
            ids = [component.content] if isinstance(component.content, int) else list(component.content)
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if ids[0] is None or tok.encode(text, add_special_tokens=False) != ids:
            raise RenderError(
                f"template: component {component.type}={component.content!r} does not round-trip "
                f"through this tokenizer as text"
            )
        return text

    def _tools_text(self, tools: list[dict] | None) -> str:
        return "\n".join(json.dumps(t, ensure_ascii=False) for t in tools or [])

    def _pieces(
        self, formatter: BaseFormatter, values: dict[str, str], items: list[str] | None, tools: list[dict] | None
    ) -> list[_Piece]:
        """Formatter output for one message (or the tools block) as literal / body pieces."""
        if isinstance(formatter, ListFormatter):
            out: list[_Piece] = []
            for k, item in enumerate(items if items is not None else [values.get("content", "")]):
                if k and formatter.separator:
                    out.append(_Piece(formatter.separator, False, True))
                out += self._pieces(
                    StringFormatter.model_construct(template=formatter.template),
                    {**values, "content": item},
                    None,
                    tools,
                )
            return out
        out = []
        for comp in formatter.template:
            if comp.type == "string":
                pos = 0
                for hit in PLACEHOLDER_RE.finditer(comp.text):
                    out.append(_Piece(comp.text[pos : hit.start()], False, comp.mask))
                    out.append(_Piece(values.get(hit.group(1), ""), True, comp.mask))
                    pos = hit.end()
                out.append(_Piece(comp.text[pos:], False, comp.mask))
            elif comp.type == "tools":
                out.append(_Piece(self._tools_text(tools), False, comp.mask))
            else:
                out.append(_Piece(self._token_text(comp), False, comp.mask))
        return [p for p in out if p.text or p.body]

    def _component_text(self, comp: TemplateComponent | None) -> str:
        if comp is None:
            return ""
        return comp.text if comp.type == "string" else self._token_text(comp)

    def _find_stop_strings(self) -> list[str]:
        if self.template.stop_tokens:
            return list(self.template.stop_tokens)
        values = {k: "" for k in PLACEHOLDERS}
        pieces = self._pieces(self.template.assistant_formatter, values, None, None)
        first = next((k for k, p in enumerate(pieces) if p.body), len(pieces))
        tail = "".join(p.text for p in pieces[first:] if not p.body and p.mask)
        specials = sorted(
            {
                t.content
                for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", False)
            },
            key=len,
            reverse=True,
        )
        hits = [(tail.find(t), t) for t in specials if t in tail]
        if hits:
            return [min(hits)[1]]
        return [self.tokenizer.eos_token] if self.tokenizer.eos_token else []

    def generation_prompt_text(self) -> str:
        pieces = self._pieces(self.template.assistant_formatter, {k: "" for k in PLACEHOLDERS}, None, None)
        return "".join(p.text for p in self._header(pieces)[0])

    @staticmethod
    def _header(pieces: list[_Piece]) -> tuple[list[_Piece], list[_Piece]]:
        """Split assistant output into header (up to the first substitution) and the rest."""
        first = next((k for k, p in enumerate(pieces) if p.body), None)
        if first is None:  # no placeholder: the header is the leading scaffolding components
            first = next((k for k, p in enumerate(pieces) if p.mask), len(pieces))
        return pieces[:first], pieces[first:]

    # ---- the renderer contract --------------------------------------------------------------------------------

    def _values(self, i: int, m: Message) -> dict[str, str]:
        content = text_of(m.get("content"))
        if m.get("tool_calls"):
            if self.template.tool_call_formatter is None:
                raise RenderError(
                    f"messages[{i}].tool_calls: template {self.template.template_name!r} has no tool_call_formatter"
                )
            for call in m["tool_calls"]:
                fn = call.get("function") or {}
                args = fn.get("arguments")
                args = json.loads(args) if isinstance(args, str) and args.strip().startswith("{") else args
                payload = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
                content += "".join(
                    p.text for p in self._pieces(self.template.tool_call_formatter, {"content": payload}, None, None)
                )
        return {"content": content, "reasoning_content": m.get("reasoning_content") or ""}

    def segments(self, messages: Sequence[Message], tools, add_generation_prompt: bool) -> list[Segment]:
        t = self.template
        out: list[Segment] = []
        if t.special_starter:
            out.append(Segment(self._component_text(t.special_starter)))
        tools_at = next((i for i, m in enumerate(messages) if m["role"] == "system"), -1) if tools else None
        if tools and t.tools_formatter is None:
            raise RenderError(f"tools: template {t.template_name!r} has no tools_formatter")

        def tools_block() -> list[Segment]:
            assert t.tools_formatter is not None  # called only with tools, refused above without a tools_formatter
            pieces = self._pieces(
                t.tools_formatter,
                {"content": self._tools_text(tools)},
                [json.dumps(x, ensure_ascii=False) for x in tools],
                tools,
            )
            return [Segment(p.text) for p in pieces]

        if tools_at == -1:
            out += tools_block()
        for i, m in enumerate(messages):
            formatter = t.formatter_for(m["role"])
            if formatter is None:
                raise RenderError(
                    f"messages[{i}].role: template {t.template_name!r} has no formatter for role {m['role']!r}"
                )
            if i and t.separator:
                out.append(Segment(self._component_text(t.separator), i - 1))
            content = m.get("content")
            items = [p.get("text", "") for p in content] if isinstance(content, list) else None
            pieces = self._pieces(formatter, self._values(i, m), items, tools)
            stopped = False
            if m["role"] == "assistant":
                segs, stopped = self._assistant_segments(i, pieces)
                out += segs
            else:
                out += [Segment(p.text, i, is_content=p.body) for p in pieces]
            if tools_at == i:
                out += tools_block()
        if add_generation_prompt:
            if messages and t.separator:
                out.append(Segment(self._component_text(t.separator), len(messages) - 1))
            out.append(Segment(self.generation_prompt_text()))
        elif t.special_stopper:
            # Sampled when it is what ends the last assistant turn (its formatter wrote no stop token).
            ends_turn = bool(messages) and messages[-1]["role"] == "assistant" and not stopped
            idx = len(messages) - 1 if ends_turn else -1
            out.append(Segment(self._component_text(t.special_stopper), idx, ends_turn, ends_turn))
        return out

    def _assistant_segments(self, i: int, pieces: list[_Piece]) -> tuple[list[Segment], bool]:
        head, rest = self._header(pieces)
        out = [Segment(p.text, i) for p in head]
        stopped = False
        for p in rest:
            if stopped or not p.mask:
                out.append(Segment(p.text, i))
                continue
            cut = len(p.text)
            if not p.body:  # the model stops at the first stop token written after the body
                hits = [p.text.find(s) + len(s) for s in self._stop_strings if s and s in p.text]
                if hits:
                    cut, stopped = min(hits), True
            out.append(Segment(p.text[:cut], i, is_content=True, sampled=True))
            if cut < len(p.text):
                out.append(Segment(p.text[cut:], i))
        return out, stopped

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(s) for s in self._stop_strings]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        tokens = list(tokens)
        stops = set(self.get_stop_sequences())
        end = next((k for k, tok in enumerate(tokens) if tok in stops), None)
        text = self.tokenizer.decode(tokens if end is None else tokens[:end], skip_special_tokens=False)
        message: Message = {"role": "assistant", "content": text}
        # With "<think>{{reasoning_content}}</think>{{content}}"-style formatters, split on the literal between.
        pieces = self._pieces(
            self.template.assistant_formatter, {"content": "\0c", "reasoning_content": "\0r"}, None, None
        )
        _, rest = self._header(pieces)
        flat = "".join(p.text for p in rest)
        if "\0r" in flat and flat.index("\0r") < flat.find("\0c"):
            between = flat[flat.index("\0r") + 2 : flat.index("\0c")]
            if between and between in text:
                reasoning, content = text.split(between, 1)
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        return message, end is not None


register_renderer(
    "declarative",
    DeclarativeRenderer,
    description="a chat format from a declarative ConversationTemplate (JSON/YAML, seed 003)",
)
