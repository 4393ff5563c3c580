"""Extract the numbered code examples from the seed documents, verbatim.

In the seed text a code line starts with its line number ("1from bios import types"); the last line of an
example may have the next heading glued to it ("22]Inference: Generating Messages"), so that line is cut
to the longest prefix that still compiles. Blocks that are not runnable code (bare signatures) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Example:
    title: str  # the prose line before the block
    code: str


def _compiles(code: str) -> bool:
    try:
        compile(code, "<seed>", "exec")
        return True
    except SyntaxError:
        return False


def examples(path: Path) -> list[Example]:
    lines = path.read_text().splitlines()
    out, k = [], 0
    while k < len(lines):
        if not re.match(r"^1(?!\d)", lines[k]):
            k += 1
            continue
        title = lines[k - 1].strip() if k else ""
        block, n = [], 1
        while k < len(lines) and lines[k].startswith(str(n)) and not lines[k][len(str(n)) :][:1].isdigit():
            block.append(lines[k][len(str(n)) :])
            n, k = n + 1, k + 1
        code = "\n".join(block)
        if not _compiles(code):
            last = block[-1]
            for cut in range(len(last), -1, -1):
                # Only a glued heading (capitalised prose) may be cut off, never code.
                if last[cut:][:1].isupper() and _compiles("\n".join(block[:-1] + [last[:cut]])):
                    code = "\n".join(block[:-1] + [last[:cut]])
                    break
            else:
                continue
        if block and _compiles(code):
            out.append(Example(title, code))
    return out
