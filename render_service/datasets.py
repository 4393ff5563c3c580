"""Chat JSONL -> `bios.types.Datum`, streamed (seed 004's shape).

Each non-blank line is `{"messages": [...], "tools"?: [...]}`. A conversation becomes tokens + weights through a
renderer's `build_supervised_example`, then one Datum for next-token prediction:

    model_input = tokens[:-1], loss_fn_inputs = {"target_tokens": tokens[1:], "weights": weights[1:]}

`iter_jsonl_data` is a generator reading one line at a time, so files larger than memory stream in constant
memory. A bad line raises RenderError (a ValueError; INVALID_ARGUMENT over gRPC) naming the source, the
line number and the field.
"""

from __future__ import annotations

import json
import os
from itertools import islice
from typing import IO, Iterable, Iterator, Sequence, TypeVar

from bios.types import Datum, ModelInput, TensorData
from bios.wire import MAX_JSON_DEPTH, WireError, check_depth
from render_service.renderers.base import TRAIN_ON_WHAT, BaseRenderer, Message, RenderError

T = TypeVar("T")


def datum_from_conversation(
    renderer: BaseRenderer,
    messages: Sequence[Message],
    tools: list[dict] | None = None,
    train_on_what: str = "last_assistant_message",
    max_length: int | None = None,
    content_sft_roles: Iterable[str] = (),
) -> Datum:
    """One conversation -> one Datum. `max_length` truncates the rendered tokens (before the shift)."""
    rendered, rendered_weights = renderer.build_supervised_example(messages, train_on_what, tools, content_sft_roles)
    tokens: list[int] = list(rendered)
    weights: list[float] = list(rendered_weights)
    if max_length is not None:
        tokens, weights = tokens[:max_length], weights[:max_length]
    if len(tokens) < 2:
        raise RenderError(f"messages: the conversation renders to {len(tokens)} token(s); need at least 2")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.coerce(tokens[1:]),
            "weights": TensorData.coerce([float(w) for w in weights[1:]]),
        },
    )


def _lines(path_or_file: str | os.PathLike | IO) -> Iterator[tuple[str, int, str]]:
    """(source name, 1-based line number, text) for every line, reading lazily."""
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        with open(name, encoding="utf-8", newline="") as handle:
            yield from _lines_of(name, handle)
    else:
        yield from _lines_of(getattr(path_or_file, "name", "<file>"), path_or_file)


def _lines_of(name: str, handle: IO) -> Iterator[tuple[str, int, str]]:
    number = 0
    while True:
        try:
            line = handle.readline()
        except UnicodeDecodeError as exc:
            raise RenderError(f"{name}, line {number + 1}: not valid UTF-8 ({exc.reason})") from None
        if not line:
            return
        number += 1
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RenderError(f"{name}, line {number}: not valid UTF-8 ({exc.reason})") from None
        yield name, number, line


def _parse_line(where: str, line: str) -> tuple[list[Message], list[dict] | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RenderError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise RenderError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    try:
        check_depth(record, where)
    except WireError as exc:
        raise RenderError(str(exc)) from None
    if not isinstance(record, dict):
        raise RenderError(f"{where}: expected a JSON object with a 'messages' field, got {type(record).__name__}")
    if "messages" not in record:
        raise RenderError(f"{where}: field 'messages' is missing")
    messages, tools = record["messages"], record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise RenderError(f"{where}: field 'messages' must be a non-empty list of messages")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RenderError(f"{where}: field 'tools' must be a list of tool objects")
    return messages, tools or None


def iter_jsonl_data(
    path_or_file: str | os.PathLike | IO,
    renderer: BaseRenderer,
    train_on_what: str = "last_assistant_message",
    max_length: int | None = None,
    content_sft_roles: Iterable[str] = (),
) -> Iterator[Datum]:
    """Stream Datums from a chat JSONL file (a path, or an open text/binary file). Blank lines are skipped."""
    yield from data_from_lines(_lines(path_or_file), renderer, train_on_what, max_length, content_sft_roles)


def data_from_lines(
    lines: Iterable[tuple[str, int, str]],
    renderer: BaseRenderer,
    train_on_what: str = "last_assistant_message",
    max_length: int | None = None,
    content_sft_roles: Iterable[str] = (),
) -> Iterator[Datum]:
    """(source name, line number, text) triples -> Datums; what both the file reader and the RPC use."""
    if train_on_what not in TRAIN_ON_WHAT:
        raise RenderError(f"train_on_what: unknown value {train_on_what!r}; expected one of {TRAIN_ON_WHAT}")
    for name, number, line in lines:
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        messages, tools = _parse_line(where, line)
        try:
            datum = datum_from_conversation(renderer, messages, tools, train_on_what, max_length, content_sft_roles)
        except RenderError as exc:  # its message names the field, e.g. "messages[2].content: ..."
            detail = str(exc) if str(exc).startswith(("messages", "tools")) else f"messages: {exc}"
            raise RenderError(f"{where}: field {detail}") from None
        yield datum


def batched(iterable: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of up to n items, lazily (the last one may be shorter)."""
    if n < 1:
        raise ValueError(f"batched: n must be at least 1, got {n}")
    iterator = iter(iterable)
    while batch := list(islice(iterator, n)):
        yield batch
