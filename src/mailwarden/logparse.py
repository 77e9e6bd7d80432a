"""Decision lines read back from a log (the grammar of `policy.logline`), wherever they went:
a syslog file (`Dec  7 10:00:00 mx mailwarden[812]: queue_id=...`), the journal's
`journalctl` output, or standard error (`mailwarden[812]: INFO queue_id=...`)."""

from __future__ import annotations

import re
from collections.abc import Iterator

_START = re.compile(r"(?:^|[\s>])(queue_id=)")
_FIELD = re.compile(r'([a-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))')
_UNESCAPE = re.compile(r"\\(.)")


def fields(line: str) -> dict[str, str] | None:
    """The fields of a decision line (quoted values unescaped), or None when `line` is not
    one: it has no `queue_id=` field, no `verdict=`, or text outside the grammar."""
    start = _START.search(line)
    if start is None:
        return None
    text = line[start.start(1):].rstrip("\r\n")
    found: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _FIELD.match(text, position)
        if match is None:
            return None
        quoted, bare = match.group(2), match.group(3)
        found[match.group(1)] = bare if quoted is None else _UNESCAPE.sub(r"\1", quoted)
        position = match.end()
        if position < len(text):
            if text[position] != " ":
                return None
            position += 1
    return found if "verdict" in found and "stage" in found else None


def decisions(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """The decision lines among `lines`, as fields."""
    for line in lines:
        parsed = fields(line)
        if parsed is not None:
            yield parsed


def client_address(client: str) -> str:
    """`mail.example.net[192.0.2.1]` -> `192.0.2.1` (Postfix's own notation)."""
    found = re.fullmatch(r".*\[([^\[\]]*)\]", client)
    return found.group(1) if found else client
