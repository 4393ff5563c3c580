"""Unicode guards: NFC invariance trusted only where this Python's Unicode database is sure."""

from __future__ import annotations

import re
import unicodedata

_BMP_UNASSIGNED: re.Pattern | None = None
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class SlowPath(Exception):
    """This text (lone surrogates, or text NFC may change) goes to an exact slower path."""


def _bmp_unassigned() -> re.Pattern:
    """A character class of the BMP code points this Python's Unicode database does not assign."""
    global _BMP_UNASSIGNED
    if _BMP_UNASSIGNED is None:
        ranges, start = [], None
        category = unicodedata.category
        for cp in range(0x80, 0x10001):
            bad = cp < 0x10000 and category(chr(cp)) in ("Cn", "Cs")
            if bad and start is None:
                start = cp
            elif not bad and start is not None:
                ranges.append((start, cp - 1))
                start = None
        body = "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges)
        _BMP_UNASSIGNED = re.compile(f"[{body}]")  # all below U+10000: sre makes it a bitmap
    return _BMP_UNASSIGNED


def nfc_invariant(text: str) -> bool:
    """True if NFC provably leaves `text` unchanged, in this Python's Unicode version and any later one."""
    if text.isascii():
        return True
    if not unicodedata.is_normalized("NFC", text):
        return False
    if text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable():
        return True  # printable characters are assigned ones (category Cn is never printable): the quick answer
    if _bmp_unassigned().search(text):
        return False
    if _ASTRAL.search(text):
        category = unicodedata.category
        return not any(category(ch) == "Cn" for ch in set(_ASTRAL.findall(text)))
    return True


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8; lone surrogates (no UTF-8 form) raise SlowPath: whatever HF does, it does."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise SlowPath from None


def check_text(text: str) -> None:
    utf8_length(text)
