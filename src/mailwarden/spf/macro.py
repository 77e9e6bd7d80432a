"""SPF macro strings (RFC 7208 §7): parsed once into tokens, expanded per evaluation.

Grammar (§7.1):
    macro-string = *( macro-expand / macro-literal )
    macro-expand = ( "%{" macro-letter transformers *delimiter "}" ) / "%%" / "%_" / "%-"
    macro-literal = %x21-24 / %x26-7E
    macro-letter = "s" / "l" / "o" / "d" / "i" / "p" / "h" / "c" / "r" / "t" / "v"
    transformers = *DIGIT [ "r" ]
    delimiter    = "." / "-" / "+" / "," / "/" / "_" / "="
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = frozenset("slodiphcrtv")
EXP_ONLY_LETTERS = frozenset("crt")  # §7.2: c, r and t are allowed only in "exp" text
DELIMITERS = frozenset(".-+,/_=")
_EXPAND = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([^}]*)\}")


@dataclass(frozen=True, slots=True)
class Macro:
    """One `%{...}` expansion."""

    letter: str  # lower-case macro letter
    url_escape: bool  # upper-case letter: URL-escape the value (§7.3)
    digits: int | None  # keep this many right-hand parts
    reverse: bool
    delimiters: str  # characters to split on; "." when none given


Token = str | Macro


@dataclass(frozen=True, slots=True)
class MacroString:
    """A parsed macro-string. `ends_with_macro` feeds the domain-end rule of §4.6.1."""

    text: str
    tokens: tuple[Token, ...]
    ends_with_macro: bool

    @property
    def literal(self) -> bool:
        return all(isinstance(tok, str) for tok in self.tokens)


@dataclass(frozen=True, slots=True)
class MacroError:
    """Why a macro-string is not valid; becomes a `permerror` cause."""

    cause: str


def parse_macro_string(text: str, *, exp: bool = False) -> MacroString | MacroError:
    """Parse `text` as a macro-string; `exp=True` also admits the c, r and t letters and SP."""
    tokens: list[Token] = []
    literal: list[str] = []
    ends_with_macro = False
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char != "%":
            if not ("\x21" <= char <= "\x7e" or (exp and char == " ")):
                return MacroError(f"character {char!r} not allowed in {text!r}")
            literal.append(char)
            pos += 1
            ends_with_macro = False
            continue
        nxt = text[pos + 1] if pos + 1 < end else ""
        if nxt in ("%", "_", "-"):
            literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
            pos += 2
            ends_with_macro = True
            continue
        if nxt != "{":
            shown = text[pos : pos + 2]
            return MacroError(f"{shown!r} is not a macro (use %% for a literal '%') in {text!r}")
        match = _EXPAND.match(text, pos)
        if match is None:
            return MacroError(f"unterminated or malformed macro at {text[pos:pos + 12]!r}")
        letter, digits, reverse, delims = match.groups()
        lower = letter.lower()
        if lower not in LETTERS:
            return MacroError(f"unknown macro letter {letter!r} in {match.group(0)!r}")
        if lower in EXP_ONLY_LETTERS and not exp:
            return MacroError(
                f"macro {match.group(0)!r} is allowed only in exp= text (RFC 7208 §7.2)"
            )
        if any(d not in DELIMITERS for d in delims):
            return MacroError(f"bad delimiter in {match.group(0)!r}")
        count: int | None = None
        if digits:
            significant = digits.lstrip("0")
            # More than 12 significant digits exceeds any label count; never int() a huge string.
            count = int(significant or "0") if len(significant) <= 12 else 10**12
            if count == 0:
                return MacroError(f"zero-part transformer in {match.group(0)!r} (RFC 7208 §7.3)")
        if literal:
            tokens.append("".join(literal))
            literal = []
        tokens.append(Macro(lower, letter.isupper(), count, bool(reverse), delims or "."))
        pos = match.end()
        ends_with_macro = True
    if literal:
        tokens.append("".join(literal))
    return MacroString(text, tuple(tokens), ends_with_macro)


@dataclass(slots=True)
class MacroContext:
    """The values the letters stand for in one evaluation (§7.3)."""

    sender: str  # s
    local_part: str  # l
    sender_domain: str  # o
    domain: str  # d
    ip_macro: str  # i: dotted quad, or dotted nibbles for IPv6
    ip_readable: str  # c
    ip_version: str  # v: "in-addr" or "ip6"
    helo: str  # h
    receiver: str  # r
    timestamp: int  # t
    validated_name: Callable[[], str]  # p: computed (with DNS) only when a string uses it

    def value(self, letter: str) -> str:
        match letter:
            case "s":
                return self.sender
            case "l":
                return self.local_part
            case "o":
                return self.sender_domain
            case "d":
                return self.domain
            case "i":
                return self.ip_macro
            case "p":
                return self.validated_name()
            case "v":
                return self.ip_version
            case "h":
                return self.helo
            case "c":
                return self.ip_readable
            case "r":
                return self.receiver
            case "t":
                return str(self.timestamp)
        raise ValueError(f"not a macro letter: {letter!r}")


def transform(value: str, macro: Macro) -> str:
    """Split on the delimiters, optionally reverse, keep the right-most parts, join with '.'."""
    if macro.digits is None and not macro.reverse and macro.delimiters == ".":
        return value
    parts = re.split("[" + re.escape(macro.delimiters) + "]", value)
    if macro.reverse:
        parts.reverse()
    if macro.digits is not None and macro.digits < len(parts):
        parts = parts[len(parts) - macro.digits :]
    return ".".join(parts)


def expand(macro_string: MacroString, ctx: MacroContext) -> str:
    """Expand a parsed macro-string; never fails (§7.3)."""
    out: list[str] = []
    for token in macro_string.tokens:
        if isinstance(token, str):
            out.append(token)
            continue
        value = transform(ctx.value(token.letter), token)
        if token.url_escape:
            # §7.3: escape everything outside RFC 3986 "unreserved".
            value = urllib.parse.quote(_utf8(value), safe="")
        out.append(value)
    return "".join(out)


def _utf8(value: str) -> bytes:
    """The octets to URL-escape. Envelope bytes the MTA sent that are not UTF-8 arrive as lone
    surrogates (U+DC80..U+DCFF) and escape as those bytes; any other lone surrogate, which no
    MTA can send, as its own three octets."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def truncate_domain(name: str, limit: int = 253) -> str:
    """§7.3: drop left-hand labels (each with its dot) until an expanded domain fits in
    `limit` characters; what is left is the label after the first dot at or past
    `len - limit - 1`. One search, however many labels a hostile expansion has."""
    if len(name) <= limit:
        return name
    dot = name.find(".", len(name) - limit - 1)
    return name[dot + 1 :] if dot >= 0 else name[len(name) - limit :]


def ip_macro_value(packed: bytes) -> str:
    """The `i` value: dotted quad for IPv4, 32 dot-separated nibbles for IPv6 (§7.3).

    The RFC leaves the case of the nibbles open (DNS matching ignores it); upper case is what
    the openspf conformance suite expects in expanded explanations."""
    if len(packed) == 4:
        return ".".join(str(b) for b in packed)
    return ".".join(packed.hex().upper())
