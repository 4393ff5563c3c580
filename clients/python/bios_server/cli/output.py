"""What the CLI shows: one logger setup, quiet third parties, colours only where wanted, one-line errors,
and a live progress line.

Colours follow `--color auto|always|never` (auto: only on a terminal, and never with $NO_COLOR set); every
coloured view prints a legend, and without colour the same information is shown with plain-text markers.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from typing import IO, Any

STYLES = {
    "prompt": "32",
    "trained": "31",
    "dim": "2",
    "bold": "1",
    "ok": "32",
    "warn": "33",
    "error": "31",
    "accent": "36",
}


class UsageError(Exception):
    """A mistake in what the user gave (a file, a flag, a name): printed as one line, exit status 2."""


def quiet_third_parties(verbosity: int) -> None:
    """No progress bars or advisory warnings from transformers / huggingface_hub / torch on the user's terminal
    (set before they are imported; -vv lets them through)."""
    if verbosity >= 2:
        return
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def setup_logging(verbosity: int) -> None:
    """The one logging setup: warnings only by default, -v info, -vv debug (third parties included)."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if verbosity < 2:
        for name in ("transformers", "huggingface_hub", "peft", "torch", "urllib3", "httpx", "uvicorn", "asyncio"):
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)


class Console:
    """stdout for results, stderr for progress and notes; `color` is already resolved to on/off."""

    def __init__(self, color: str = "auto", out: IO[str] | None = None, err: IO[str] | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.color = color == "always" or (color == "auto" and _is_tty(self.out) and not os.environ.get("NO_COLOR"))
        self.live = _is_tty(self.err)  # a status line rewritten in place; off a terminal only whole lines
        self._status_shown = False

    def paint(self, text: str, style: str) -> str:
        return f"\033[{STYLES[style]}m{text}\033[0m" if self.color else text

    def print(self, text: str = "", err: bool = False) -> None:
        self.clear_status()
        print(text, file=self.err if err else self.out, flush=True)

    def note(self, text: str) -> None:
        """A line about the run (where things are, what was resumed): stderr, so stdout stays the results."""
        self.print(text, err=True)

    def status(self, text: str) -> None:
        """A progress line rewritten in place on a terminal; nothing elsewhere (callers log whole lines)."""
        if not self.live:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.err.write("\r\033[K" + text[:width] if not self.color else "\r\033[K" + text)
        self.err.flush()
        self._status_shown = True

    def clear_status(self) -> None:
        if self._status_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self._status_shown = False


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class Progress:
    """Steps of a run: a bar with loss per token and tokens/s, rewritten in place on a terminal."""

    def __init__(self, console: Console, total: int, first: int = 0, unit: str = "step"):
        self.console, self.total, self.done, self.first, self.unit = console, total, first, first, unit
        self.started = time.monotonic()
        self.tokens = 0

    def update(self, step: int, tokens: int, fields: str) -> None:
        self.done, self.tokens = step, self.tokens + tokens
        elapsed = time.monotonic() - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = (self.total - step) * elapsed / max(1, step - self.first)
        filled = round(20 * step / max(1, self.total))
        bar = self.console.paint("█" * filled, "accent") + self.console.paint("░" * (20 - filled), "dim")
        self.console.status(
            f"{bar} {self.unit} {step}/{self.total}  {fields}  {rate:,.0f} tok/s  {duration(elapsed)}<{duration(left)}"
        )

    def tokens_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0
