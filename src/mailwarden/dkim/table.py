"""The signing table: which keys sign a message, chosen by its author (From) address.

An entry's pattern is one of (OpenDKIM's SigningTable forms, its `refile:` wildcards
included): `user@example.com` (that address), `*@example.com` or `example.com` (the domain),
`*@*.example.com` or `*.example.com` (its subdomains, not the domain itself), `*` (any
author). The first entry that matches decides, as in OpenDKIM with `refile:`; its keys may
belong to another domain (d= is the key's domain, which DMARC then does not align)."""

from __future__ import annotations

import re

_LABELS = r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(_LABELS + r"\Z")
_LOCAL = re.compile(r"[^\s@*]+\Z")


def normalize(pattern: str) -> str:
    """The canonical form (`user@domain`, `*@domain`, `*@*.domain` or `*`), lower-cased; a
    ValueError says what is wrong with any other."""
    text = pattern.strip().lower().rstrip(".")
    if text == "*":
        return text
    local, at, domain = text.rpartition("@")
    if not at:
        local = "*"
    if domain.startswith("*."):
        if local != "*":
            raise ValueError(f"{pattern!r}: a subdomain wildcard goes with any user (*@*.DOMAIN)")
        domain_part, prefix = domain[2:], "*."
    else:
        domain_part, prefix = domain, ""
    if not _DOMAIN.match(domain_part):
        raise ValueError(f"{pattern!r}: {domain_part!r} is not a domain name")
    if local != "*" and not _LOCAL.match(local):
        raise ValueError(f"{pattern!r}: {local!r} is not a local part (or *)")
    return f"{local}@{prefix}{domain_part}"


def matches(pattern: str, address: str) -> bool:
    """Does the author `address` match the normalized `pattern`?"""
    if pattern == "*":
        return True
    address = address.lower().rstrip(".")
    local, _, domain = address.rpartition("@")
    want_local, _, want_domain = pattern.rpartition("@")
    if want_local != "*" and want_local != local:
        return False
    if want_domain.startswith("*."):
        return domain.endswith(want_domain[1:])
    return domain == want_domain


def covers(general: str, specific: str) -> bool:
    """Does every author that normalized `specific` matches also match `general`?"""
    if general == "*":
        return True
    if specific == "*":
        return False
    g_local, _, g_domain = general.rpartition("@")
    s_local, _, s_domain = specific.rpartition("@")
    if g_local != "*" and g_local != s_local:
        return False
    if g_domain.startswith("*."):
        return s_domain.endswith(g_domain[1:]) or s_domain == g_domain
    return not s_domain.startswith("*.") and s_domain == g_domain
