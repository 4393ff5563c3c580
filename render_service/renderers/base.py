"""The renderer contract: messages -> segments of text -> tokens with per-token attribution.

A family renderer only says which text each message becomes (`segments`) and which tokens end a turn
(`get_stop_sequences`); this abstract base turns the segments into tokens in ONE tokenizer pass (so BPE
merges across wrapper/body boundaries are exactly what the chat template gives) and derives weights,
prompts and stop strings from the attribution. The generic renderer is chat_template.ChatTemplateRenderer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from bios.errors import InvalidArgumentError
from bios.rendered import AttributionRun, RenderedTokens
from bios.types import ModelInput, Tokens
from render_service.renderers.fast_tokenize import encode_segments

Message = dict[str, Any]
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
_KNOWN_ROLES = frozenset(KNOWN_ROLES)
TRAIN_ON_WHAT = (
    "last_assistant_message",
    "last_assistant_turn",
    "all_assistant_messages",
    "all_messages",
    "customized",
)


class RenderError(InvalidArgumentError):
    """Malformed conversation; the message names the offending message index and field (INVALID_ARGUMENT)."""


class Segment(NamedTuple):
    """A run of rendered text and where it came from (a tuple: a renderer makes dozens per conversation)."""

    text: str
    message_index: int = -1  # -1: template scaffolding outside any message
    is_content: bool = False  # message-body bytes (or the assistant's sampled emission)
    sampled: bool = False  # the model emits this text when it writes the message


@dataclass
class SupervisedExample:
    rendered: RenderedTokens
    run_weights: list[float]  # the loss weight of every token of rendered.runs[k]

    @property
    def weights(self) -> list[float]:
        """One loss weight per token."""
        return self.rendered.per_token(self.run_weights)


def text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI-style parts list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


def required_text(message: Mapping[str, Any], index: int, family: str) -> str:
    """A message's text where the family's template needs a content field even beside tool calls."""
    if "content" not in message:
        raise RenderError(f"messages[{index}].content: missing (the {family} template needs it)")
    return text_of(message["content"])


def call_name_and_arguments(index: int, k: int, call: Mapping[str, Any]) -> tuple[str, Any]:
    """(name, arguments) of messages[index].tool_calls[k], OpenAI-shaped or flat; both are required."""
    function = call.get("function") or call
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise RenderError(f"messages[{index}].tool_calls[{k}].function.name: missing")
    if arguments is None:
        raise RenderError(f"messages[{index}].tool_calls[{k}].function.arguments: missing (use {{}} for no arguments)")
    return name, arguments


def validate_messages(messages: Sequence[Mapping[str, Any]], field: str = "messages", ordering: bool = True) -> None:
    """Roles, content and optional field types; with `ordering`, also that tool results follow tool calls.
    `field` names the list in errors (a caller's own name for it, e.g. "new_turn.messages")."""
    if not isinstance(messages, (list, tuple)):
        raise RenderError(f"{field}: expected a list of messages, got {type(messages).__name__}")
    open_calls, any_call = 0, False
    for i, m in enumerate(messages):
        if type(m) is not dict and not isinstance(m, Mapping):  # the exact-type test first: it is the cheap one
            raise RenderError(f"{field}[{i}]: expected a mapping, got {type(m).__name__}")
        role = m.get("role")
        if type(role) is not str or role not in _KNOWN_ROLES:
            raise RenderError(f"{field}[{i}].role: unknown role {role!r}; expected one of {KNOWN_ROLES}")
        content = m.get("content")
        if content is None:
            if "content" not in m and not m.get("tool_calls"):
                raise RenderError(f"{field}[{i}].content: missing (use '' for an empty message)")
        elif type(content) is not str:
            if not isinstance(content, (str, list)):
                raise RenderError(
                    f"{field}[{i}].content: expected a string or a list of parts, got {type(content).__name__}"
                )
            for j, part in enumerate(content if isinstance(content, list) else ()):
                if not isinstance(part, Mapping) or not isinstance(part.get("text", ""), str):
                    raise RenderError(f"{field}[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}")
                if part.get("type", "text") != "text":  # an image would be dropped without a word
                    raise RenderError(
                        f"{field}[{i}].content[{j}].type: {part.get('type')!r} parts are not supported (text only)"
                    )
        if len(m) != 2 or content is None:  # more than role and content: the optional fields, when present
            _validate_optional_fields(m, f"{field}[{i}]")
        if role == "assistant":
            open_calls = len(m.get("tool_calls") or ())
            any_call = any_call or open_calls > 0
        elif role == "tool":
            if ordering and open_calls == 0 and not any_call:
                raise RenderError(f"{field}[{i}].role: tool message with no preceding assistant tool call")
        elif role == "user":
            open_calls = 0


_STRING_FIELDS = ("tool_call_id", "name", "reasoning_content")


def _validate_optional_fields(m: Mapping[str, Any], where: str) -> None:
    """Types of a message's optional fields (from JSON they can be anything; over gRPC they are typed already)."""
    for key in _STRING_FIELDS:
        if m.get(key) is not None and not isinstance(m[key], str):
            raise RenderError(f"{where}.{key}: expected a string, got {type(m[key]).__name__}")
    if m.get("trainable") is not None and not isinstance(m["trainable"], bool):
        raise RenderError(f"{where}.trainable: expected true or false, got {type(m['trainable']).__name__}")
    calls = m.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, (list, tuple)):
        raise RenderError(f"{where}.tool_calls: expected a list of tool calls, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise RenderError(f"{where}.tool_calls[{k}]: expected {{'function': {{'name', 'arguments'}}}}")
        if not isinstance(function.get("name", ""), str):
            raise RenderError(f"{where}.tool_calls[{k}].function.name: expected a string")


def validate_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    """Each tool is a function with a name (OpenAI-shaped {"type": "function", "function": {...}}, or flat)."""
    if not isinstance(tools, (list, tuple)):
        raise RenderError(f"tools: expected a list of tool objects, got {type(tools).__name__}")
    for k, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RenderError(f"tools[{k}].function.name: missing (a tool needs a name)")


def validate_sft_roles(roles: Iterable[str], field: str = "content_sft_roles") -> set[str]:
    """The roles whose message bodies are also supervised; an unknown role would silently match nothing."""
    roles = list(roles)
    for k, role in enumerate(roles):
        if role not in _KNOWN_ROLES:
            raise RenderError(f"{field}[{k}]: unknown role {role!r}; expected one of {KNOWN_ROLES}")
    return set(roles)


class BaseRenderer(ABC):
    """Base of every renderer family: a subclass defines `segments` and `get_stop_sequences` (and usually
    `parse_response`); rendering, prompts, supervised weights and the option/tokenizer checks are shared."""

    name: str
    # The options a family reads (named like the template variables they stand for); any other is refused.
    option_names: tuple[str, ...] = ()
    # The family's special tokens: each must be one token of the tokenizer, or the ids would spell it out as text
    # (a renderer paired with another family's tokenizer). Empty: the renderer follows the tokenizer's own template.
    special_tokens: tuple[str, ...] = ()
    # Message fields ("tools", "tool_calls", "reasoning_content") the family's format has no place for: refused
    # naming the field, rather than dropped without a word.
    cannot_represent: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any, **options: Any):
        self.tokenizer = tokenizer
        self.options = options
        self._special_ids: dict[str, Any] = {}  # per-renderer cache of looked-up token ids
        self._check_options()

    def check_tokenizer(self, tokenizer_name: str | None = None) -> None:
        """RenderError naming both when a special token of the family is not one token of the tokenizer."""
        for token in self.special_tokens:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if (
                token_id is None
                or token_id == self.tokenizer.unk_token_id
                or self.tokenizer.encode(token, add_special_tokens=False) != [token_id]
            ):
                name = tokenizer_name or getattr(self.tokenizer, "name_or_path", "") or "given"
                raise RenderError(
                    f"renderer: {self.name!r} does not match the tokenizer {name!r}: its special token "
                    f"{token!r} is not a token of that tokenizer (leave the renderer out to follow the "
                    f"tokenizer, or give the tokenizer of a model of the {self.name} family)"
                )

    def _refuse_unrepresentable(self, messages: Sequence[Message], tools: list[dict] | None) -> None:
        if tools and "tools" in self.cannot_represent:
            raise RenderError(
                f"tools: the {self.name} renderer cannot represent tools (its format has no tool "
                "declarations); use a renderer whose format has them, e.g. qwen3"
            )
        for i, m in enumerate(messages):
            for key in self.cannot_represent:
                if key != "tools" and m.get(key):
                    raise RenderError(
                        f"messages[{i}].{key}: the {self.name} renderer cannot represent it (its "
                        "format has no place for it); use a renderer whose format does, e.g. qwen3"
                    )

    def _check_options(self) -> None:
        """An option nothing reads would be dropped without a word: refuse it, naming it."""
        for key in self.options:
            if key not in self.option_names:
                known = ", ".join(self.option_names) or "none"
                raise RenderError(
                    f"renderer.options.{key}: not an option of the {self.name} renderer (its options: {known})"
                )

    # ---- what a family defines ----------------------------------------------------------------

    @abstractmethod
    def segments(
        self, messages: Sequence[Message], tools: list[dict] | None, add_generation_prompt: bool
    ) -> list[Segment]:
        """The conversation's text, cut into attributed segments."""

    @abstractmethod
    def get_stop_sequences(self) -> list[int]:
        """Token ids that end an assistant turn."""

    def get_stop_strings(self) -> list[str]:
        return [self.tokenizer.convert_ids_to_tokens(i) for i in self.get_stop_sequences()]

    def parse_response(self, tokens: Sequence[int], tools: list[dict] | None = None) -> tuple[Message, bool]:
        """Tokens sampled after the generation prompt -> (assistant message, ended with a stop token)."""
        tokens = list(tokens)
        stops = set(self.get_stop_sequences())
        end = next((k for k, t in enumerate(tokens) if t in stops), None)
        body = tokens if end is None else tokens[:end]
        return {"role": "assistant", "content": self.tokenizer.decode(body)}, end is not None

    # ---- derived ------------------------------------------------------------------------------

    def render(
        self, messages: Sequence[Message], tools: list[dict] | None = None, add_generation_prompt: bool = False
    ) -> RenderedTokens:
        validate_messages(messages)
        if tools:
            validate_tools(tools)
        if self.cannot_represent:
            self._refuse_unrepresentable(messages, tools)
        segs = self.segments(list(messages), tools, add_generation_prompt)
        roles = [m["role"] for m in messages]
        return tokenize_segments(self.tokenizer, segs, roles)

    def build_generation_prompt(
        self, messages: Sequence[Message], prefill: str | None = None, tools: list[dict] | None = None
    ) -> ModelInput:
        return self.render_generation_prompt(messages, prefill, tools).to_model_input()

    def render_generation_prompt(
        self, messages: Sequence[Message], prefill: str | None = None, tools: list[dict] | None = None
    ) -> RenderedTokens:
        rendered = self.render(messages, tools, add_generation_prompt=True)
        if not prefill:
            return rendered
        extra = self.tokenizer.encode(prefill, add_special_tokens=False)
        prefilled = AttributionRun(len(extra), len(messages), "assistant", True, True)
        return RenderedTokens.from_runs(rendered.token_ids + extra, [*rendered.runs, prefilled])

    def build_supervised_example(
        self,
        messages: Sequence[Message],
        train_on_what: str = "last_assistant_message",
        tools: list[dict] | None = None,
        content_sft_roles: Iterable[str] = (),
    ) -> tuple[Tokens, list[float]]:
        ex = self.supervised_example(messages, train_on_what, tools, content_sft_roles)
        return Tokens(ex.rendered.token_ids), ex.weights

    def supervised_example(
        self,
        messages: Sequence[Message],
        train_on_what: str = "last_assistant_message",
        tools: list[dict] | None = None,
        content_sft_roles: Iterable[str] = (),
    ) -> SupervisedExample:
        sft_roles = validate_sft_roles(content_sft_roles)
        rendered = self.render(messages, tools)
        trained = trained_messages(messages, train_on_what)
        whole_messages = train_on_what in ("all_messages", "customized")

        def weight(run: AttributionRun) -> float:  # a token's weight depends only on its attribution
            on = run.message_index in trained and (run.sampled or (whole_messages and run.role != "assistant"))
            return 1.0 if on or (run.is_content and run.role in sft_roles) else 0.0

        return SupervisedExample(rendered, [weight(run) for run in rendered.runs])


def trained_messages(messages: Sequence[Message], train_on_what: str) -> set[int]:
    """Indices of the messages whose tokens carry weight."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on_what == "last_assistant_message":
        return set(assistants[-1:])
    if train_on_what == "all_assistant_messages":
        return set(assistants)
    if train_on_what == "last_assistant_turn":
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        return {i for i in assistants if i > last_user}
    if train_on_what == "all_messages":
        return set(range(len(messages)))
    if train_on_what == "customized":
        return {i for i, m in enumerate(messages) if m.get("trainable")}
    raise RenderError(f"train_on_what: unknown value {train_on_what!r}; expected one of {TRAIN_ON_WHAT}")


def tokenize_segments(tokenizer: Any, segments: Sequence[Segment], roles: Sequence[str]) -> RenderedTokens:
    """Tokenize the concatenated text once and attribute each token to the segment of its first char.

    The ids are exactly `tokenizer(joined text, add_special_tokens=False)`'s; fast_tokenize reproduces them
    (and where each token starts) without the HF call wherever that is proven exact, else makes the call.
    """
    ids, counts = encode_segments(tokenizer, [seg.text for seg in segments])
    return _attribute(ids, counts, segments, roles)


def _attribute(
    ids: list[int], counts: Sequence[int], segments: Sequence[Segment], roles: Sequence[str]
) -> RenderedTokens:
    """Attribution runs from how many tokens start in each segment (per segment, not per token)."""
    lengths: list[int] = []
    keys: list[tuple[int, bool, bool]] = []
    last = None
    for (_text, index, content, sampled), n in zip(segments, counts):
        if n:
            key = (index, sampled, content)
            if key == last:  # neighbouring segments with one attribution make one run
                lengths[-1] += n
            else:
                lengths.append(n)
                keys.append(key)
                last = key
    n_roles = len(roles)
    make = AttributionRun._make
    runs = [make((n, i, roles[i] if 0 <= i < n_roles else None, s, c)) for n, (i, s, c) in zip(lengths, keys)]
    return RenderedTokens.from_runs(ids, runs, canonical=True)
