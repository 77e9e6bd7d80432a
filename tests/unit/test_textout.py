"""`textout.shown`: what is not printable is escaped, readably and reversibly enough to tell
what was there."""

from __future__ import annotations

import pytest

from mailwarden.textout import shown


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain text, é ü 日本", "plain text, é ü 日本"),
    ("a\r\nb", "a\\r\\nb"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("x\x00y\x7f\x85", "x\\x00y\\x7f\\x85"),
    ("\u202eevil", "\\u202eevil"),
    (b"a\xffb".decode("utf-8", "surrogateescape"), "a\\xffb"),
    ("tab\tline\n", "tab\\tline\\n"),
])
def test_shown(raw: str, escaped: str) -> None:
    assert shown(raw) == escaped


def test_kept_characters_pass() -> None:
    assert shown("a\tb\nc\rd", keep="\n\t") == "a\tb\nc\\rd"
