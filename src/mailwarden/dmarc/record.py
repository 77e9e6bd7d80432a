"""DMARC policy records (RFC 9989 §4.7): a tag list starting with v=DMARC1.

Every problem is reported as a warning; invalid values fall back to the defaults, unknown tags
are ignored, and the tags RFC 9989 removed (pct, rf, ri) are ignored with a warning. A record
whose p= is missing or invalid is read as p=none when it has a valid rua= (RFC 9989 §4.7),
otherwise it is not a usable record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POLICIES = ("none", "quarantine", "reject")
# tag-spec (§4.7): the value is stripped by str.strip() (the same whitespace as \s), not by
# a lazy `(.*?)\s*\Z`, which backtracks quadratically over a long run of inner whitespace.
_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=(.*)", re.DOTALL)
_MAILTO = re.compile(r"mailto:[^@\s,;!]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z0-9-]{2,}"
                     r"(?:![0-9]+[kmgt]?)?\Z", re.IGNORECASE)
_FO = re.compile(r"[01ds](?:[ \t]*:[ \t]*[01ds])*\Z")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    text: str
    p: str
    sp: str
    np: str
    adkim: str = "r"
    aspf: str = "r"
    psd: str = "u"
    testing: bool = False
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    p_explicit: bool = True
    warnings: tuple[str, ...] = ()
    pct: int = 100  # RFC 7489 §6.3: honoured only in dmarc.mode: legacy
    rf: tuple[str, ...] = ("afrf",)  # RFC 7489 §6.3 failure report formats (legacy only)


@dataclass(frozen=True, slots=True)
class NotARecord:
    reason: str


_VERSION = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")


def is_dmarc(text: str) -> bool:
    """§4.7/§4.8: the first tag is v=DMARC1 (tag name case-insensitive, value exact, WSP
    around the '=' allowed)."""
    return _VERSION.match(text) is not None


def parse(text: str) -> DmarcRecord | NotARecord:
    if not is_dmarc(text):
        return NotARecord("does not begin with v=DMARC1")
    warnings: list[str] = []
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        if not part.strip():
            continue
        match = _TAG.match(part)
        if match is None:
            warnings.append(f"malformed tag {part.strip()!r} ignored")
            continue
        name, value = match.group(1).lower(), match.group(2).strip()
        if name in tags:
            warnings.append(f"tag {name}= repeated; the first one counts")
            continue
        tags[name] = value
    for removed in ("pct", "rf", "ri"):
        if removed in tags:
            honoured = "" if removed == "ri" else " (dmarc.mode: legacy honours it)"
            warnings.append(f"{removed}= was removed by RFC 9989 and is ignored{honoured}")
    known = {"v", "p", "sp", "np", "psd", "t", "adkim", "aspf", "rua", "ruf", "fo",
             "pct", "rf", "ri"}
    for name in tags:
        if name not in known:
            warnings.append(f"unknown tag {name}= ignored")

    def uris(name: str) -> tuple[str, ...]:
        found = []
        for uri in (u.strip() for u in tags.get(name, "").split(",") if u.strip()):
            if _MAILTO.match(uri):
                found.append(uri)
            else:
                warnings.append(f"{name}= URI {uri!r} is not a valid mailto: URI; ignored")
        return tuple(found)

    rua, ruf = uris("rua"), uris("ruf")

    def choice(name: str, allowed: tuple[str, ...], default: str) -> str:
        value = tags.get(name)
        if value is None:
            return default
        if value.lower() not in allowed:
            warnings.append(f"{name}={_shown(value)} is not one of {'/'.join(allowed)}; "
                            f"using {default}")
            return default
        return value.lower()

    p_value = tags.get("p", "").lower()
    p_explicit = p_value in POLICIES
    if not p_explicit:
        if not rua:
            return NotARecord("no valid p= and no valid rua= (RFC 9989 §4.7)")
        warnings.append("p= missing or invalid: read as p=none because rua= is valid")
        p_value = "none"
    sp = choice("sp", POLICIES, p_value)
    np = choice("np", POLICIES, sp)
    pct = _pct(tags.get("pct"), warnings)
    return DmarcRecord(
        text=text, p=p_value, sp=sp, np=np,
        adkim=choice("adkim", ("r", "s"), "r"), aspf=choice("aspf", ("r", "s"), "r"),
        psd=choice("psd", ("y", "n", "u"), "u"), testing=choice("t", ("y", "n"), "n") == "y",
        rua=rua, ruf=ruf, fo=_fo(tags.get("fo"), warnings), p_explicit=p_explicit,
        warnings=tuple(warnings), pct=pct,
        rf=tuple(f.strip().lower() for f in tags.get("rf", "afrf").split(":") if f.strip()),
    )


def _pct(value: str | None, warnings: list[str]) -> int:
    """RFC 7489 §6.3 pct=: an integer 0-100; anything else means 100."""
    if value is None:
        return 100
    if not value.isdigit() or int(value) > 100:
        warnings.append(f"pct={_shown(value)} is not an integer from 0 to 100; using 100")
        return 100
    return int(value)


def _shown(value: str) -> str:
    """A tag value for a warning: as is when printable, else with Python escapes, so that a
    record's control characters never reach a terminal or a log line raw."""
    return value if value.isprintable() else repr(value)[1:-1]


def _fo(value: str | None, warnings: list[str]) -> str:
    """fo=: colon-separated 0, 1, d, s; anything else falls back to 0 (§4.8)."""
    if value is None:
        return "0"
    if not _FO.match(value):
        warnings.append(f"fo={_shown(value)} is not a list of 0, 1, d, s; using 0")
        return "0"
    return value.replace(" ", "").replace("\t", "")
