"""Where an aggregate report may go (RFC 9990): the rua= URIs that are usable (`mailto:`, with
their `!size` limits), and the verification of external destinations (a TXT record
`v=DMARC1...` at `<policy-domain>._report._dmarc.<host>` when the host is outside the policy
domain's Organizational Domain)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from mailwarden.dmarc.orgdomain import Discovery, TemporaryError
from mailwarden.dmarc.report import normalize_domain
from mailwarden.dns import DNSClient, Status

# --------------------------------------------------------------------------- destinations

_MAILTO = re.compile(r"^mailto:([^?!]+)(?:\?[^!]*)?(?:!(\d+)([kmgt]?))?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class Destination:
    address: str
    limit: int | None  # bytes, from the URI's "!size"

    @property
    def host(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def key(self) -> str:
        return f"mailto:{self.address}"


def parse_uri(uri: str) -> Destination | str:
    """A mailto: destination, or why the URI cannot be used."""
    match = _MAILTO.match(uri.strip())
    if match is None:
        scheme = uri.partition(":")[0]
        if not uri.lower().startswith("mailto:"):
            return f"unsupported URI scheme {scheme!r}"
        return "malformed mailto: URI"
    address = unquote(match.group(1)).strip()
    local, at, host = address.rpartition("@")
    if not at or not local or "." not in host or any(c.isspace() for c in address):
        return "malformed mailto: address"
    limit = None
    if match.group(2):
        limit = int(match.group(2)) * _UNITS[match.group(3).lower()]
    return Destination(f"{local}@{normalize_domain(host)}", limit)


def _is_dmarc_tags(text: str) -> dict[str, str] | None:
    """The tags of a verification record, or None if it does not start with v=DMARC1."""
    parts = text.split(";")
    if parts[0].replace(" ", "").replace("\t", "") != "v=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


class Verifier:
    """RFC 9990's verification of external destinations; answers are kept for one run."""

    def __init__(self, dns: DNSClient) -> None:
        self.dns = dns
        self.discovery = Discovery(dns)
        self._org: dict[str, str] = {}

    def org(self, domain: str) -> str:
        if domain not in self._org:
            self._org[domain] = self.discovery.organizational_domain(domain)
        return self._org[domain]

    def destinations(self, policy_domain: str, dest: Destination,
                     kind: str = "rua") -> list[Destination] | tuple[str, str]:
        """The destinations to use for `dest` (itself, or the override of its verification
        record: its rua=, or its ruf= for failure reports, RFC 9991 §5), or (status, why)
        when it cannot be used."""
        try:
            if self.org(policy_domain) == self.org(dest.host):
                return [dest]
        except TemporaryError as exc:
            return ("failed", f"temporary DNS error finding Organizational Domains: {exc}")
        try:
            a_label = policy_domain.encode("idna").decode("ascii")
        except UnicodeError:
            return ("skipped", f"policy domain {policy_domain!r} has no A-label form")
        name = f"{a_label}._report._dmarc.{dest.host}"
        if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
            return ("skipped", f"verification name {name} exceeds DNS limits")
        answer = self.dns.txt(name)
        if answer.status is Status.TEMPERROR:
            return ("failed", f"temporary DNS error verifying {name}: {answer.error}")
        records = [tags for tags in (_is_dmarc_tags(text) for text in answer.records)
                   if tags is not None]
        if not records:
            return ("skipped", f"external destination not authorised: no v=DMARC1 record at "
                               f"{name} ({answer.status})")
        overrides: list[Destination] = []
        for tags in records:
            for uri in (u.strip() for u in tags.get(kind, "").split(",") if u.strip()):
                parsed = parse_uri(uri)
                if isinstance(parsed, str):
                    continue
                if parsed.host != dest.host:
                    return ("skipped", f"the verification record at {name} redirects to "
                                       f"{parsed.host}, another host: neither is used")
                overrides.append(parsed)
        return list(dict.fromkeys(overrides)) or [dest]


