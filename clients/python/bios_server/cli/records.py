"""Chat JSONL files as the CLI reads them: every record keeps its line number, so that an error anywhere later
(here, in a renderer, in the render service) is reported as `FILE:LINE: field: what is wrong`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bios_server.cli.output import UsageError


@dataclass
class Record:
    line: int
    messages: list[dict]
    tools: list[dict] | None

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}


def _open_text(path: str, what: str) -> str:
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{path}: no such file ({what})")
    if file.is_dir():
        raise UsageError(f"{path}: is a directory, not a {what}")
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror})") from None


def read_tools(path: str | None) -> list[dict] | None:
    """`--tools FILE.json`: a JSON list of tool objects (or {"tools": [...]}), for records without their own."""
    if path is None:
        return None
    try:
        value = json.loads(_open_text(path, "JSON file of tools"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UsageError(f"{path}: tools: expected a JSON list of tool objects")
    return value


def read_records(path: str, default_tools: list[dict] | None = None) -> list[Record]:
    """Every non-blank line of a chat JSONL file: {"messages": [...], "tools"?: [...]}; shape errors name the line."""
    records = []
    for number, text in enumerate(_open_text(path, "chat JSONL file").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise UsageError(f"{where}: expected a JSON object with 'messages', got {type(record).__name__}")
        if "messages" not in record:
            raise UsageError(f'{where}: messages: missing (each line is {{"messages": [...], "tools"?: [...]}})')
        messages, tools = record["messages"], record.get("tools")
        if not isinstance(messages, list) or not messages:
            raise UsageError(f"{where}: messages: expected a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UsageError(
                    f"{where}: messages[{i}]: expected an object with 'role' and 'content', "
                    f"got {type(message).__name__}"
                )
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise UsageError(f"{where}: tools: expected a list of tool objects")
        records.append(Record(number, messages, (tools or None) if "tools" in record else default_tools))
    if not records:
        raise UsageError(f"{path}: no conversations (every line is blank)")
    return records


_CONVERSATION = re.compile(r"^(?:[A-Z_]+: )?conversations\[(\d+)\]\.(.*)$", re.S)


def at_line(path: str, records: list[Record], message: str) -> str | None:
    """`conversations[k].messages[1].role: ...` (a batch error) as `FILE:LINE: messages[1].role: ...`."""
    match = _CONVERSATION.match(message)
    if not match or int(match.group(1)) >= len(records):
        return None
    return f"{path}:{records[int(match.group(1))].line}: {match.group(2)}"
