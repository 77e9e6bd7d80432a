"""The `signing` section: the key table (each key loaded and checked now, never at the first
message), staged keys, the signing table and the signature options."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from mailwarden.config.model import SigningConfig, SigningEntry
from mailwarden.config.reader import Section, as_section, domain_name

if TYPE_CHECKING:
    from mailwarden.dkim.keys import SigningKey

_SELECTOR = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")
STATES = ("active", "staged")


def signing_section(top: Section) -> SigningConfig:
    from mailwarden.dkim.keys import ALGORITHMS, KeyError_, load_key
    from mailwarden.dkim.sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN

    section = top.section("signing")
    if section is None:
        return SigningConfig((), DEFAULT_HEADERS, DEFAULT_OVERSIGN)
    allow_readable = section.boolean("allow_group_readable_keys", False)
    keys: list[SigningKey] = []
    for path, node in section.sequence("keys"):
        entry = as_section(node, top.file, path)
        domain = entry.parsed("domain", "", domain_name) if entry.has("domain") else ""
        if not domain:
            raise entry.error("domain", "is required")
        if not entry.has("selector"):
            raise entry.error("selector", "is required")
        selector = entry.raw("selector")  # as written: 2024.10 is not the number 2024.1
        if not _SELECTOR.match(selector):
            raise entry.error("selector", f"not a valid selector: {selector!r}")
        key_path = entry.string("key", required=True)
        algorithm = entry.optional_str("algorithm")
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise entry.error("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        staged = entry.string("state", "active", choices=STATES) == "staged"
        try:
            key = load_key(domain, selector, key_path, algorithm,
                           allow_group_readable=allow_readable)
        except KeyError_ as exc:
            raise entry.error("key", str(exc)) from None
        if any(k.domain == domain and k.selector == selector for k in keys):
            raise entry.error("selector", f"{domain}/{selector} is listed twice")
        keys.append(dataclasses.replace(key, staged=staged))
        entry.finish()
    table = _table(section, tuple(keys))
    headers = tuple(h.lower() for h in section.str_list("headers", DEFAULT_HEADERS))
    if "from" not in headers:
        raise section.error("headers", "From must be signed (RFC 6376 §5.4)")
    oversign = tuple(h.lower() for h in section.str_list("oversign", DEFAULT_OVERSIGN))
    canon = section.string("canonicalization", "relaxed/relaxed",
                           choices=("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                    "simple/simple"))
    header_canon, _, body_canon = canon.partition("/")
    parent_domains = section.boolean("parent_domains", True)
    section.finish()
    return SigningConfig(tuple(keys), headers, oversign, (header_canon, body_canon),
                         parent_domains, table)


def _table(section: Section, keys: tuple[SigningKey, ...]) -> tuple[SigningEntry, ...]:
    """signing.table: `{from: PATTERN, keys: [DOMAIN/SELECTOR, ...]}` entries, in order."""
    from mailwarden.dkim.table import normalize

    by_name = {f"{k.domain}/{k.selector}".lower(): k for k in keys}
    entries = []
    for path, node in section.sequence("table"):
        entry = as_section(node, section.file, path)
        try:
            pattern = normalize(entry.string("from", required=True))
        except ValueError as exc:
            raise entry.error("from", str(exc)) from None
        chosen = []
        for name in entry.str_list("keys"):
            key = by_name.get(name.lower().rstrip("."))
            if key is None:
                known = ", ".join(sorted(by_name)) or "none"
                raise entry.error("keys", f"{name!r} is not in signing.keys "
                                          f"(DOMAIN/SELECTOR; known: {known})")
            chosen.append(key)
        if not chosen:
            raise entry.error("keys", "at least one DOMAIN/SELECTOR")
        entries.append(SigningEntry(pattern, tuple(chosen)))
        entry.finish()
    return tuple(entries)
