"""Human-readable output that cannot be turned against the reader.

What a report shows was often written by someone else: a HELO name, a sender, a From field, a
DNS record, the reason a key failed. Shown as it is, a carriage return rewrites the line on a
terminal, an escape sequence drives it, a line feed forges a line of the report, a right-to-left
override reverses what follows, and a byte that is not UTF-8 (kept by Python as a lone
surrogate) makes `print` raise under a strict UTF-8 locale. `shown()` escapes all of these;
`install()` puts the same escaping, line feeds and tabs excepted, under every `print` of a
command, with whatever the terminal's encoding cannot show written as `\\x..`/`\\u....`.
"""

from __future__ import annotations

import io
import re
import sys
from typing import TextIO

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNPRINTABLE = re.compile(r"[^ -~]")  # all but printable ASCII and space


def printable(text: str) -> str:
    """Printable ASCII, anything else as "?": a log line's or a header field's value."""
    return _UNPRINTABLE.sub("?", text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str, keep: str = "") -> str:
    """`text` with every character that is not printable escaped (line feeds and tabs too,
    unless in `keep`)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


class _Escaping(io.TextIOBase):
    """A text stream that escapes what it is given (line feeds and tabs pass) before the
    stream under it encodes it, which escapes what its encoding cannot hold."""

    def __init__(self, under: TextIO) -> None:
        self.under = under

    def write(self, text: str) -> int:
        self.under.write(shown(text, keep="\n\t"))
        return len(text)

    def flush(self) -> None:
        self.under.flush()

    def fileno(self) -> int:
        return self.under.fileno()

    def isatty(self) -> bool:
        return self.under.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.under.encoding

    @property
    def buffer(self) -> object:
        """The byte stream under it, for output that is data, not text (a signed message)."""
        return self.under.buffer


def install() -> None:
    """Escape everything a command prints from now on (standard output and error)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Escaping):
            continue
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
        setattr(sys, name, _Escaping(stream))
