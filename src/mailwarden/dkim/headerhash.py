"""The header part of a DKIM signature: field parsing, selection and canonicalization.

RFC 6376 §5.4.2: the fields named in h= are taken from the bottom of the header up, one per
name occurrence; a name listed more often than it occurs contributes nothing (the "null string")
for the extra occurrences. §3.7: the DKIM-Signature field itself is hashed last, with the value
of b= emptied and without its final CRLF. §3.4.1 simple leaves fields as received; §3.4.2 relaxed
lowercases the name, unfolds, turns every run of WSP into one SP and trims the value.

Parsing accepts LF or CRLF line ends and a leading mbox "From " line, as dkimpy does, so both
verifiers read a message the same way.
"""

from __future__ import annotations

import re

_NAME = re.compile(rb"[\x21-\x7e]+?:")
_FOLD = re.compile(rb"\r?\n")
_WSP = re.compile(rb"[\t ]+")
# The start of the b= tag inside the signature field, and the run its value may take.
_B_TAG = re.compile(rb"[;\s]b\s*=")
_B_VALUE = re.compile(rb"[\sA-Za-z0-9+/=]*")


class HeaderFormatError(ValueError):
    """A header line that is neither a field, a continuation, nor an mbox "From " line."""


def parse_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs; the value is everything after the colon, continuation lines
    included, each line ending in CRLF. Parsing stops at the first empty line."""
    fields: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break
        if line[0] in (0x20, 0x09):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line + b"\r\n")
                continue
            raise HeaderFormatError("a continuation line before the first header field")
        match = _NAME.match(line)
        if match is not None:
            fields.append((line[: match.end() - 1], line[match.end():] + b"\r\n"))
        elif not line.startswith(b"From "):
            raise HeaderFormatError(f"unexpected characters in the header: {line[:60]!r}")
    return fields


def without_b(value: bytes) -> bytes:
    """The signature field's value with the value of b= deleted (§3.7): its base64 characters
    and the white space between them go; white space after the last one stays, except a
    final line break."""
    out: list[bytes] = []
    start = 0
    for match in _B_TAG.finditer(value):
        if match.start() < start:
            continue
        run = _B_VALUE.match(value, match.end())
        end = run.end() if run else match.end()
        kept = len(value[match.end():end].rstrip())
        cut = match.end() + kept
        if value[cut:] in (b"\r\n", b"\n"):
            cut = len(value)
        out.append(value[start:match.end()])
        start = cut
    out.append(value[start:])
    return b"".join(out)


def relaxed_value(value: bytes) -> bytes:
    """§3.4.2 for one value, CRLF not appended."""
    if b"\x0b" in value or b"\x0c" in value or value.count(b"\r") != value.count(b"\r\n"):
        return _WSP.sub(b" ", _FOLD.sub(b"", value)).strip()
    # bytes.split() splits on exactly SP, HTAB, CR and LF here: unfold, compress and trim
    return b" ".join(value.split())


def select(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> list[tuple[bytes, bytes]]:
    """§5.4.2 selection, bottom up; `names` are lowercase."""
    chosen: list[tuple[bytes, bytes]] = []
    lowered = [name.lower() for name, _ in fields]
    last: dict[bytes, int] = {}
    for name in names:
        index = last.get(name, len(fields))
        while index > 0:
            index -= 1
            if lowered[index] == name:
                chosen.append(fields[index])
                break
        last[name] = index
    return chosen


def signed_data(fields: list[tuple[bytes, bytes]], names: list[bytes],
                signature: tuple[bytes, bytes], relaxed: bool) -> bytes:
    """The octets the header hash covers, in order."""
    names = list(names)
    if b"from" in names:
        # A second From field is hashed too when there is one, so that adding a From above a
        # signed message cannot pass (RFC 6376 §8.15; dkimpy does the same).
        names.append(b"from")
    parts: list[bytes] = []
    stripped = without_b(signature[1])
    for name, value in [*select(fields, names), (signature[0], stripped)]:
        if relaxed:
            parts.append(name.lower().rstrip() + b":" + relaxed_value(value) + b"\r\n")
        else:
            parts.append(name + b":" + value)
    parts[-1] = parts[-1].rstrip()  # the signature field is hashed without its CRLF (§3.7)
    return b"".join(parts)
