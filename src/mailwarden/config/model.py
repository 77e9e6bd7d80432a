"""The typed, frozen configuration: what the reader (`config.build`) produces and every other
layer reads. No parsing here."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mailwarden.dns import Nameserver
from mailwarden.results import Result
from mailwarden.verdict import Action, Mode, Stage

STAGES = tuple(Stage(name) for name in ("connect", "helo", "mail", "rcpt", "eom"))
ACTIONS = tuple(str(action) for action in Action)
TRANSPORTS = ("libmilter", "native")
MODES = tuple(str(mode) for mode in Mode)
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a rule does with one result: an action and, for reject/tempfail, its reply
    (None fields take the check's defaults)."""

    action: Action
    code: int | None = None
    status: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    """`when:` — every given test must hold."""

    client_in: tuple[str, ...] = ()  # host group names
    authenticated: bool | None = None
    sender_domain_in: tuple[str, ...] = ()
    rcpt_domain_in: tuple[str, ...] = ()
    negate: Condition | None = None  # `not: {...}`


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str
    stage: Stage
    check: str
    args: Any  # the check's own frozen dataclass
    when: Condition | None
    on: Mapping[Result, Outcome]
    line: int
    mode: Mode = Mode.ENFORCE  # monitor: the verdict is logged and counted, never applied


class LogTarget(StrEnum):
    """Where log lines go."""

    STDERR = "stderr"  # standard error: a terminal, a file, or the journal under systemd
    SYSLOG = "syslog"  # the local syslog socket (RFC 3164 lines, with a facility)
    JOURNAL = "journal"  # systemd-journald's native socket (structured fields)


LOG_FACILITIES = ("mail", "daemon", "user", *(f"local{n}" for n in range(8)))


@dataclass(frozen=True, slots=True)
class LogConfig:
    target: LogTarget = LogTarget.STDERR
    facility: str = "mail"  # the syslog facility: `mail` goes to /var/log/mail.log
    address: str = ""  # the syslog or journal socket; empty: the system's


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[Nameserver, ...] = ()  # empty: /etc/resolv.conf
    timeout: float = 2.0
    lifetime: float = 5.0
    cache_size: int = 10_000


@dataclass(frozen=True, slots=True)
class SigningEntry:
    """A signing-table entry: authors matching `pattern` (`dkim.table`) get `keys`."""

    pattern: str
    keys: tuple[Any, ...]  # mailwarden.dkim.keys.SigningKey


@dataclass(frozen=True, slots=True)
class SigningConfig:
    keys: tuple[Any, ...] = ()  # mailwarden.dkim.keys.SigningKey, staged ones included
    headers: tuple[str, ...] = ()
    oversign: tuple[str, ...] = ()
    canonicalization: tuple[str, str] = ("relaxed", "relaxed")
    parent_domains: bool = True
    table: tuple[SigningEntry, ...] = ()  # empty: each author domain signs with its own keys

    @property
    def active(self) -> tuple[Any, ...]:
        """The keys that sign: a staged key is checked, never used."""
        return tuple(k for k in self.keys if not k.staged)

    def keys_for_author(self, address: str) -> tuple[Any, ...]:
        """The keys that sign mail from `address`: the first matching table entry's, or
        without a table, those of its domain or (parent_domains) of its closest parent
        that has keys. Staged keys never sign."""
        from mailwarden.dkim.table import matches

        if self.table:
            entry = next((e for e in self.table if matches(e.pattern, address)), None)
            return () if entry is None else tuple(k for k in entry.keys if not k.staged)
        domain = address.rpartition("@")[2].lower().rstrip(".")
        while domain:
            found = tuple(k for k in self.active if k.domain == domain)
            if found or not self.parent_domains:
                return found
            _, _, domain = domain.partition(".")
        return ()


@dataclass(frozen=True, slots=True)
class FailureReportsConfig:
    """`dmarc.failure_reports:` (RFC 9991): present means on, for the domains whose record
    asks for them with ruf=."""

    rate_limit: int = 10  # reports per destination address per hour; the rest are dropped
    domains: tuple[str, ...] = ()  # only these policy domains (empty: every domain)
    redact: bool = True  # local-parts replaced by a keyed hash (RFC 6590)


@dataclass(frozen=True, slots=True)
class DmarcConfig:
    mode: str = "rfc9989"  # or "legacy": RFC 7489's Public Suffix List
    store: str = ""  # sqlite path/URL or postgresql://...; empty: evaluations are not stored
    reports: Mapping[str, Any] = field(default_factory=dict)
    failure_reports: FailureReportsConfig | None = None  # None: off


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`limits:`: what one transaction may cost in DNS queries and work, whatever the sender
    publishes or sends. The SPF limits are RFC 7208 §4.6.4's and can only be lowered."""

    spf_dns_lookups: int = 10  # DNS-querying terms per SPF evaluation (past it: permerror)
    spf_void_lookups: int = 2  # lookups answering NXDOMAIN/no data (past it: permerror)
    spf_mx_names: int = 10  # names of one `mx` term's MX answer (more: permerror)
    spf_ptr_names: int = 10  # PTR names a `ptr` term or %{p} looks up (the rest ignored)
    iprev_names: int = 10  # PTR names iprev looks up (the rest ignored)
    dkim_signatures: int = 8  # DKIM-Signature fields verified per message (the rest: neutral)
    arc_sets: int = 50  # ARC sets validated (more: arc=fail, RFC 8617 §4.2.1's maximum)
    header_fields: int = 1000  # header fields kept for the checks (the rest are not)
    header_bytes: int = 4 * 1024 * 1024  # bytes of header fields kept for the checks
    header_field_bytes: int = 64 * 1024  # bytes kept of one header field (the rest cut off)


# limits: key, minimum, maximum, and why the maximum when it is a standard's.
LIMIT_RANGES: tuple[tuple[str, int, int, str], ...] = (
    ("spf_dns_lookups", 1, 10, "RFC 7208 §4.6.4 allows at most 10"),
    ("spf_void_lookups", 0, 10, ""),
    ("spf_mx_names", 1, 10, "RFC 7208 §4.6.4 allows at most 10"),
    ("spf_ptr_names", 1, 10, "RFC 7208 §4.6.4 allows at most 10"),
    ("iprev_names", 1, 50, ""),
    ("dkim_signatures", 1, 64, ""),
    ("arc_sets", 1, 50, "RFC 8617 §4.2.1 allows at most 50"),
    ("header_fields", 10, 1_000_000, ""),
    ("header_bytes", 64 * 1024, 64 * 1024 * 1024, ""),
    ("header_field_bytes", 1024, 1024 * 1024, ""),
)


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    listen: str
    authserv_id: str
    user: str | None = None
    group: str | None = None
    socket_mode: int = 0o660
    log_level: str = "info"
    workers: int = 2
    drain_timeout: float = 30.0
    dns: DNSConfig = DNSConfig()
    spf_budget: float = 20.0
    domains: frozenset[str] = frozenset()
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rules: Mapping[Stage, tuple[RuleConfig, ...]] = field(default_factory=dict)
    signing: SigningConfig = SigningConfig()
    spool_threshold: int = 1024 * 1024
    dmarc: DmarcConfig = DmarcConfig()
    mode: Mode = Mode.ENFORCE  # the rules' default; monitor: nothing is refused
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: none
    limits: LimitsConfig = LimitsConfig()
    socket_group: str | None = None  # group of the unix socket (the MTA's); default: `group`
    spool_directory: str | None = None  # where large bodies are spooled; default: $TMPDIR
    transport: str = "libmilter"  # or "native": our own milter protocol implementation
    progress_interval: float = 5.0  # seconds a reply may take before the MTA hears "alive"
    stage_budget: float = 25.0  # seconds the checks of one stage may take: then temperror
    log: LogConfig = LogConfig()

    def stage_rules(self, stage: Stage) -> tuple[RuleConfig, ...]:
        return self.rules.get(stage, ())

    def all_rules(self) -> Iterator[RuleConfig]:
        for stage in STAGES:
            yield from self.stage_rules(stage)

    def is_our_domain(self, domain: str) -> bool:
        """A domain we receive mail for: one listed, or a subdomain of one listed."""
        domain = domain.lower().rstrip(".")
        while domain:
            if domain in self.domains:
                return True
            _, _, domain = domain.partition(".")
        return False


def default_workers() -> int:
    """Two worker processes per core: each spends part of its time waiting for its sockets and
    for the GIL, so a second one per core keeps the core busy (measured: verify at 16
    connections on 2 cores, 2 workers ~2,200 msg/s, 4 workers ~2,400-2,700)."""
    return 2 * (os.cpu_count() or 1)


