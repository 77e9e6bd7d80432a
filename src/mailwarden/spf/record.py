"""SPF record syntax (RFC 7208 §4.5, §4.6, §5, §6): text to a typed `Record`, or a `RecordError`.

Parsing never raises: every syntax error becomes a `RecordError` naming the offending term,
which `check_host()` reports as `permerror` (§4.6: "If there are any syntax errors anywhere in
the record, check_host() returns immediately with the result "permerror"").
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from mailwarden.spf.macro import MacroError, MacroString, parse_macro_string

QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
# §4.6.4: these terms cause DNS queries and count towards the limit of 10.
DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})

_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9\-_.]*)(.*)", re.DOTALL)
# dual-cidr-length at the end of a/mx: [ "/" ip4-cidr ] [ "//" ip6-cidr ]
_DUAL_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")
_CIDR_NUMBER = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")
# toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL = re.compile(
    r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\Z"
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Directive:
    """`[qualifier] mechanism`: the result it gives when it matches, and its arguments."""

    text: str
    qualifier: str  # "+", "-", "~" or "?"
    mechanism: str
    domain_spec: MacroString | None = None
    network: IPNetwork | None = None  # ip4 / ip6
    cidr4: int = 32
    cidr6: int = 128

    @property
    def result(self) -> str:
        return QUALIFIERS[self.qualifier]


@dataclass(frozen=True, slots=True)
class Modifier:
    """A `name=value` term that this implementation does not act on (kept, §6)."""

    text: str
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Record:
    text: str
    directives: tuple[Directive, ...]
    redirect: MacroString | None = None
    exp: MacroString | None = None
    unknown_modifiers: tuple[Modifier, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordError:
    """A syntax error: `term` is the offending term ("" for the record as a whole)."""

    cause: str
    term: str = ""

    def __str__(self) -> str:
        return f"{self.cause} in term {self.term!r}" if self.term else self.cause


def is_spf_record(text: str) -> bool:
    """§4.5: the record begins with exactly "v=spf1", followed by SP or the end of the record."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


# Records longer than this are parsed every time rather than cached: a hostile domain can
# publish TXT records of up to 64 KiB, and 4096 of those would pin hundreds of megabytes.
# §3.4 asks for records that fit a 512-octet UDP answer, so real ones are far below it.
CACHED_LENGTH = 2048


def parse_record(text: str) -> Record | RecordError:
    """Parse the text of one SPF record (which `is_spf_record` accepted). Any text gives a
    `Record` or a `RecordError` whose cause is one printable line; short texts are cached."""
    if len(text) <= CACHED_LENGTH:
        return _parse_cached(text)
    return _parse(text)


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Record | RecordError:
    return _parse(text)


def _parse(text: str) -> Record | RecordError:
    if not is_spf_record(text):
        return RecordError('record does not begin with "v=spf1"')
    if not text.isascii():
        bad = next(ch for ch in text if not ch.isascii())
        term = next((t for t in text.split(" ") if not t.isascii()), "")
        return RecordError(f"non-ASCII character {bad!r} (RFC 7208 §3.1)", term)
    directives: list[Directive] = []
    unknown: list[Modifier] = []
    redirect: MacroString | None = None
    exp: MacroString | None = None
    for term in text[6:].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier is not None:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if (redirect if name == "redirect" else exp) is not None:
                    return RecordError(f"{name}= appears more than once (RFC 7208 §6)", term)
                spec = _domain_spec(value, term)
                if isinstance(spec, RecordError):
                    return spec
                if name == "redirect":
                    redirect = spec
                else:
                    exp = spec
            else:
                parsed = parse_macro_string(value)
                if isinstance(parsed, MacroError):
                    return RecordError(f"bad modifier value: {parsed.cause}", term)
                unknown.append(Modifier(term, name, value))
            continue
        directive = _parse_directive(term)
        if isinstance(directive, RecordError):
            return directive
        directives.append(directive)
    return Record(text, tuple(directives), redirect, exp, tuple(unknown))


def _parse_directive(term: str) -> Directive | RecordError:
    match = _MECHANISM.fullmatch(term)
    if match is None:
        return RecordError("not a mechanism or modifier", term)
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)
    if name not in MECHANISMS:
        return RecordError(f"unknown mechanism {name!r}", term)
    if name == "all":
        if rest:
            return RecordError('"all" takes no arguments', term)
        return Directive(term, qualifier, name)
    if name in ("ip4", "ip6"):
        return _parse_ip(term, qualifier, name, rest)
    if name in ("a", "mx"):
        cidr = _DUAL_CIDR.search(rest)
        assert cidr is not None  # the pattern matches the empty string at the end
        cidr4, cidr6 = 32, 128
        if cidr.group(1) is not None:
            value = _cidr(cidr.group(1), 32, term)
            if isinstance(value, RecordError):
                return value
            cidr4 = value
        if cidr.group(2) is not None:
            value = _cidr(cidr.group(2), 128, term)
            if isinstance(value, RecordError):
                return value
            cidr6 = value
        rest = rest[: cidr.start()]
        spec = _optional_domain_spec(rest, term)
        if isinstance(spec, RecordError):
            return spec
        return Directive(term, qualifier, name, spec, cidr4=cidr4, cidr6=cidr6)
    if name == "ptr":
        spec = _optional_domain_spec(rest, term)
        if isinstance(spec, RecordError):
            return spec
        return Directive(term, qualifier, name, spec)
    # include, exists: a domain-spec is required.
    if not rest.startswith(":"):
        return RecordError(f'"{name}" requires ":domain"', term)
    spec = _domain_spec(rest[1:], term)
    if isinstance(spec, RecordError):
        return spec
    return Directive(term, qualifier, name, spec)


def _optional_domain_spec(rest: str, term: str) -> MacroString | RecordError | None:
    if not rest:
        return None
    if not rest.startswith(":"):
        return RecordError("unexpected text after mechanism name", term)
    return _domain_spec(rest[1:], term)


def _domain_spec(text: str, term: str) -> MacroString | RecordError:
    """domain-spec = macro-string domain-end
    domain-end = ( "." toplabel [ "." ] ) / macro-expand"""
    if not text:
        return RecordError("empty domain-spec", term)
    parsed = parse_macro_string(text)
    if isinstance(parsed, MacroError):
        return RecordError(parsed.cause, term)
    if not parsed.ends_with_macro and not _valid_domain_end(text):
        return RecordError("domain-spec does not end in a valid top-level label", term)
    return parsed


def _valid_domain_end(text: str) -> bool:
    if text.endswith("."):
        text = text[:-1]
    dot = text.rfind(".")
    if dot < 0:
        return False
    return _TOPLABEL.match(text[dot + 1 :]) is not None


def _cidr(text: str, maximum: int, term: str) -> int | RecordError:
    if _CIDR_NUMBER.match(text) is None or int(text) > maximum:
        return RecordError(f"bad CIDR length {'/' + text!r}", term)
    return int(text)


def _parse_ip(term: str, qualifier: str, name: str, rest: str) -> Directive | RecordError:
    if not rest.startswith(":"):
        return RecordError(f'"{name}" requires ":address"', term)
    address, slash, length = rest[1:].partition("/")
    maximum = 32 if name == "ip4" else 128
    prefix = maximum
    if slash:
        value = _cidr(length, maximum, term)
        if isinstance(value, RecordError):
            return value
        prefix = value
    if "%" in address:
        return RecordError(f"bad address {address!r}", term)
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address
        ip = ipaddress.IPv4Address(address) if name == "ip4" else ipaddress.IPv6Address(address)
    except ValueError:
        return RecordError(f"bad {'IPv4' if name == 'ip4' else 'IPv6'} address {address!r}", term)
    network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    return Directive(term, qualifier, name, network=network)
