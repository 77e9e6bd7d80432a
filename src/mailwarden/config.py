"""YAML configuration to a typed, frozen `Config`.

Every error names the file, the line and the key path (`rules.mail[1].policy`); unknown keys are
errors, so that a typo never silently turns a check off. Check-specific arguments are validated
by the check itself (`mailwarden.checks`), through the same `Section` reader.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mailwarden.dns import Nameserver, parse_nameserver

T = TypeVar("T")

STAGES = ("connect", "helo", "mail", "rcpt", "eom")
ACTIONS = ("continue", "accept", "tempfail", "reject", "quarantine", "discard")
TRANSPORTS = ("libmilter", "native")
MODES = ("enforce", "monitor")
LOG_LEVELS = ("debug", "info", "warning", "error")
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class ConfigError(Exception):
    """A configuration problem, located: `file:line: key: message`."""

    def __init__(self, file: str, line: int, key: str, message: str) -> None:
        self.file, self.line, self.key, self.message = file, line, key, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")


# -- the node reader ---------------------------------------------------------------------------
class Section:
    """A YAML mapping being read: typed getters that record what was used, and `finish()` to
    reject every key that nobody asked for."""

    # When a set: every key path the reader asks about is added to it (the configuration
    # reference is tested against what the parser reads, so that the two cannot drift).
    trace: set[str] | None = None

    def __init__(self, node: yaml.MappingNode, file: str, path: str) -> None:
        self.node, self.file, self.path = node, file, path
        self._items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise ConfigError(file, _line(key_node), path, "keys must be strings")
            if key in self._items:
                raise ConfigError(file, _line(key_node), self.key(key), "duplicate key")
            self._items[key] = (key_node, value_node)
        self._used: set[str] = set()

    # -- locating ----------------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str | None, message: str) -> ConfigError:
        if name is not None and name in self._items:
            return ConfigError(self.file, _line(self._items[name][1]), self.key(name), message)
        return ConfigError(self.file, _line(self.node), self.key(name) if name else self.path,
                           message)

    def key_error(self, name: str, message: str) -> ConfigError:
        """An error located at the key itself (for keys that should not be there)."""
        return ConfigError(self.file, _line(self._items[name][0]), self.key(name), message)

    def has(self, name: str) -> bool:
        if Section.trace is not None:
            Section.trace.add(self.key(name))
        return name in self._items

    def names(self) -> list[str]:
        return list(self._items)

    def node_of(self, name: str) -> yaml.Node:
        if Section.trace is not None:
            Section.trace.add(self.key(name))
        self._used.add(name)
        return self._items[name][1]

    def finish(self) -> None:
        for name, (key_node, _) in self._items.items():
            if name not in self._used:
                raise ConfigError(self.file, _line(key_node), self.key(name), "unknown key")

    # -- typed getters -------------------------------------------------------------------------
    def _scalar(self, name: str) -> Any:
        node = self.node_of(name)
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(name, "expected a single value")
        return _construct(node)

    def raw(self, name: str) -> str:
        """A scalar exactly as written (`0660` stays `0660`, not YAML's octal 432)."""
        node = self.node_of(name)
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(name, "expected a single value")
        return str(node.value)

    def string(self, name: str, default: str | None = None, *, choices: tuple[str, ...] = (),
            required: bool = False) -> str:
        if not self.has(name):
            if required or default is None:
                raise self.error(name, "is required")
            return default
        value = self._scalar(name)
        if value is None or isinstance(value, (dict, list)):
            raise self.error(name, "expected a string")
        text = value if isinstance(value, str) else _to_text(value)
        if choices and text not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)} (got {text!r})")
        return text

    def optional_str(self, name: str) -> str | None:
        return self.string(name) if self.has(name) else None

    def boolean(self, name: str, default: bool) -> bool:
        if not self.has(name):
            return default
        value = self._scalar(name)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false (got {value!r})")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0,
               maximum: float | None = None) -> float:
        if not self.has(name):
            return default
        value = self._scalar(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"expected a number (got {value!r})")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else \
                f"at least {minimum:g}"
            raise self.error(name, f"must be {bound} (got {value!r})")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int = 0,
            maximum: int | None = None) -> int:
        value = self.number(name, default, minimum=minimum, maximum=maximum)
        if value != int(value):
            raise self.error(name, f"expected a whole number (got {value!r})")
        return int(value)

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of strings; a single string counts as a one-element list."""
        if not self.has(name):
            return default
        node = self.node_of(name)
        if isinstance(node, yaml.ScalarNode):
            value = self._scalar(name)
            return (value if isinstance(value, str) else _to_text(value),)
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(name, "expected a list")
        items: list[str] = []
        for index, item in enumerate(node.value):
            if not isinstance(item, yaml.ScalarNode):
                raise ConfigError(self.file, _line(item), f"{self.key(name)}[{index}]",
                                  "expected a string")
            value = _construct(item)
            if value is None:
                raise ConfigError(self.file, _line(item), f"{self.key(name)}[{index}]",
                                  "empty value")
            items.append(value if isinstance(value, str) else _to_text(value))
        return tuple(items)

    def section(self, name: str) -> Section | None:
        if not self.has(name):
            return None
        node = self.node_of(name)
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return Section(yaml.MappingNode("tag:yaml.org,2002:map", []), self.file,
                           self.key(name))
        if not isinstance(node, yaml.MappingNode):
            raise self.error(name, "expected a mapping")
        return Section(node, self.file, self.key(name))

    def sequence(self, name: str) -> list[tuple[str, yaml.Node]]:
        """The items of a list as (key path, node)."""
        if not self.has(name):
            return []
        node = self.node_of(name)
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(name, "expected a list")
        return [(f"{self.key(name)}[{i}]", item) for i, item in enumerate(node.value)]

    def parsed(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        """A string value turned into something else by `parse` (ValueError = bad value)."""
        if not self.has(name):
            return default
        text = self.string(name)
        try:
            return parse(text)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None


def _construct(node: yaml.ScalarNode) -> Any:
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1 if node.start_mark is not None else 0


def _to_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_section(node: yaml.Node, file: str, path: str) -> Section:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(file, _line(node), path, "expected a mapping")
    return Section(node, file, path)


# -- the configuration ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, RFC 3463 enhanced status code and text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a rule does with one result: an action and, for reject/tempfail, its reply
    (None fields take the check's defaults)."""

    action: str
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
    stage: str
    check: str
    args: Any  # the check's own frozen dataclass
    when: Condition | None
    on: Mapping[str, Outcome]
    line: int
    mode: str = "enforce"  # monitor: the verdict is logged and counted, never applied


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[Nameserver, ...] = ()  # empty: /etc/resolv.conf
    timeout: float = 2.0
    lifetime: float = 5.0
    cache_size: int = 10_000


@dataclass(frozen=True, slots=True)
class SigningConfig:
    keys: tuple[Any, ...] = ()  # mailwarden.dkim.keys.SigningKey
    headers: tuple[str, ...] = ()
    oversign: tuple[str, ...] = ()
    canonicalization: tuple[str, str] = ("relaxed", "relaxed")
    parent_domains: bool = True

    def keys_for(self, domain: str) -> tuple[Any, ...]:
        """The keys of `domain`, or (parent_domains) of its closest parent that has keys."""
        domain = domain.lower().rstrip(".")
        while domain:
            found = tuple(k for k in self.keys if k.domain == domain)
            if found or not self.parent_domains:
                return found
            _, _, domain = domain.partition(".")
        return ()


@dataclass(frozen=True, slots=True)
class DmarcConfig:
    mode: str = "rfc9989"  # or "legacy": RFC 7489's Public Suffix List
    store: str = ""  # sqlite path/URL or postgresql://...; empty: evaluations are not stored
    reports: Mapping[str, Any] = field(default_factory=dict)


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
_LIMIT_RANGES: tuple[tuple[str, int, int, str], ...] = (
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
    rules: Mapping[str, tuple[RuleConfig, ...]] = field(default_factory=dict)
    signing: SigningConfig = SigningConfig()
    spool_threshold: int = 1024 * 1024
    dmarc: DmarcConfig = DmarcConfig()
    mode: str = "enforce"  # the rules' default; monitor: nothing is refused
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: none
    limits: LimitsConfig = LimitsConfig()
    socket_group: str | None = None  # group of the unix socket (the MTA's); default: `group`
    spool_directory: str | None = None  # where large bodies are spooled; default: $TMPDIR
    transport: str = "libmilter"  # or "native": our own milter protocol implementation

    def stage_rules(self, stage: str) -> tuple[RuleConfig, ...]:
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


def parse_listen(text: str) -> str:
    """libmilter's socket syntax: `unix:PATH`, `inet:PORT@HOST`, `inet6:PORT@HOST`
    (`inet:HOST:PORT` as Postfix writes it is accepted and converted)."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("unix", "local", "inet", "inet6"):
        raise ValueError(f"expected unix:PATH, inet:PORT@HOST or inet6:PORT@HOST, not {text!r}")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"the unix socket path must be absolute: {text!r}")
        return f"unix:{rest}"
    if "@" not in rest and kind == "inet" and rest.count(":") == 1:
        host, _, port = rest.partition(":")
        rest = f"{port}@{host}"
    port, _, host = rest.partition("@")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    if host:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not _DOMAIN.match(host):
                raise ValueError(f"bad host in {text!r}") from None
    return f"{kind}:{port}@{host}" if host else f"{kind}:{port}"


def parse_status(text: str) -> str:
    if not _STATUS.match(text):
        raise ValueError(f"not an RFC 3463 enhanced status code: {text!r}")
    return text


def _domain(text: str) -> str:
    name = text.lower().rstrip(".")
    if not _DOMAIN.match(name):
        raise ValueError(f"not a domain name: {text!r}")
    return name


def load(path: str | Path) -> Config:
    """Read and validate a configuration file; raises ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, 0, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, 0, "", f"not UTF-8 text: {exc}") from None
    return parse(text, file)


def parse(text: str, file: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(file, line, "", f"YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, 0, "", f"YAML error: {exc}") from None
    if node is None:
        raise ConfigError(file, 1, "", "the file is empty")
    top = as_section(node, file, "")
    return _build(top)


def _build(top: Section) -> Config:
    from mailwarden.checks import CHECKS  # the checks validate their own arguments

    listen = top.parsed("listen", "inet:8894@127.0.0.1", parse_listen)
    authserv_id = top.parsed("authserv_id", "", _domain) if top.has("authserv_id") else ""
    if not authserv_id:
        raise top.error("authserv_id", "is required (the name in our Authentication-Results)")
    user = top.optional_str("user")
    group = top.optional_str("group")
    socket_mode = 0o660
    if top.has("socket_mode"):
        try:
            socket_mode = _octal_mode(top.raw("socket_mode"))
        except ValueError as exc:
            raise top.error("socket_mode", str(exc)) from None
    log_level = top.string("log_level", "info", choices=LOG_LEVELS)
    workers = top.integer("workers", default_workers(), minimum=1, maximum=64)
    drain_timeout = top.number("drain_timeout", 30.0, minimum=0, maximum=3600)

    dns = DNSConfig()
    dns_section = top.section("dns")
    if dns_section is not None:
        servers: list[Nameserver] = []
        port = dns_section.integer("port", 53, minimum=1, maximum=65535)
        for index, text in enumerate(dns_section.str_list("nameservers")):
            try:
                servers.append(parse_nameserver(text, default_port=port))
            except ValueError as exc:
                raise ConfigError(top.file, _line(dns_section.node_of("nameservers")),
                                  f"dns.nameservers[{index}]", str(exc)) from None
        dns = DNSConfig(
            tuple(servers),
            dns_section.number("timeout", 2.0, minimum=0.05, maximum=60),
            dns_section.number("lifetime", 5.0, minimum=0.05, maximum=120),
            dns_section.integer("cache_size", 10_000, minimum=0, maximum=10_000_000),
        )
        dns_section.finish()

    spf_budget = 20.0
    spf_section = top.section("spf")
    if spf_section is not None:
        spf_budget = spf_section.number("budget", 20.0, minimum=0.1, maximum=600)
        spf_section.finish()

    domains: list[str] = []
    for index, text in enumerate(top.str_list("domains")):
        try:
            domains.append(_domain(text))
        except ValueError as exc:
            raise ConfigError(top.file, _line(top.node_of("domains")), f"domains[{index}]",
                              str(exc)) from None

    hosts: dict[str, tuple[str, ...]] = {}
    hosts_section = top.section("hosts")
    if hosts_section is not None:
        from mailwarden.relay import check_host_entry

        for name in hosts_section.names():
            entries = hosts_section.str_list(name)
            for index, entry in enumerate(entries):
                problem = check_host_entry(entry)
                if problem:
                    raise ConfigError(top.file, _line(hosts_section.node_of(name)),
                                      f"hosts.{name}[{index}]", problem)
            hosts[name] = entries
        hosts_section.finish()

    signing = _signing(top)
    spool_threshold = top.integer("spool_threshold", 1024 * 1024, minimum=0,
                                  maximum=1024 * 1024 * 1024)
    dmarc = _dmarc(top)
    socket_group = top.optional_str("socket_group")
    spool_directory = top.optional_str("spool_directory")
    if spool_directory is not None and not spool_directory.startswith("/"):
        raise top.error("spool_directory", "must be an absolute path")
    mode = top.string("mode", "enforce", choices=MODES)
    metrics_listen = _metrics(top)
    limits = _limits(top)
    transport = top.string("transport", "libmilter", choices=TRANSPORTS)
    partial = Config(top.file, listen, authserv_id, user, group, socket_mode, log_level, workers,
                     drain_timeout, dns, spf_budget, frozenset(domains), hosts, {}, signing,
                     spool_threshold, dmarc, mode, metrics_listen, limits, socket_group,
                     spool_directory, transport)
    rules: dict[str, tuple[RuleConfig, ...]] = {}
    rules_section = top.section("rules")
    if rules_section is not None:
        for stage in rules_section.names():
            if stage not in STAGES:
                raise rules_section.key_error(stage,
                                              f"unknown stage (stages: {', '.join(STAGES)})")
            parsed: list[RuleConfig] = []
            names: set[str] = set()
            for path, node in rules_section.sequence(stage):
                rule = _rule(as_section(node, top.file, path), stage, partial, CHECKS)
                if rule.name in names:
                    raise ConfigError(top.file, rule.line, path,
                                      f"duplicate rule name {rule.name!r}")
                names.add(rule.name)
                parsed.append(rule)
            rules[stage] = tuple(parsed)
        rules_section.finish()
    top.finish()
    return dataclasses.replace(partial, rules=rules)


def _limits(top: Section) -> LimitsConfig:
    """limits: every key is read, given or not, so that each default comes from one place."""
    section = top.section("limits")
    if section is None:
        empty = yaml.MappingNode("tag:yaml.org,2002:map", [])
        section = Section(empty, top.file, top.key("limits"))
    defaults = LimitsConfig()
    values: dict[str, int] = {}
    for name, minimum, maximum, why in _LIMIT_RANGES:
        value = section.integer(name, getattr(defaults, name), minimum=minimum)
        if value > maximum:
            bound = f"at most {maximum}" + (f": {why}, it can only be lowered" if why else "")
            raise section.error(name, f"must be {bound} (got {value})")
        values[name] = value
    if values["header_field_bytes"] > values["header_bytes"]:
        raise section.error("header_field_bytes",
                            f"must not exceed {section.key('header_bytes')} "
                            f"({values['header_bytes']})")
    section.finish()
    return LimitsConfig(**values)


def _metrics(top: Section) -> str:
    """metrics: the address of the Prometheus endpoint (absent: no endpoint)."""
    from mailwarden.metrics import parse_address

    section = top.section("metrics")
    if section is None:
        return ""
    address = section.string("listen", required=True)
    try:
        parse_address(address)
    except ValueError as exc:
        raise section.error("listen", str(exc)) from None
    section.finish()
    return address


def _dmarc(top: Section) -> DmarcConfig:
    """dmarc: the organizational-domain mode, the report store, the reporter settings."""
    section = top.section("dmarc")
    if section is None:
        return DmarcConfig()
    mode = section.string("mode", "rfc9989", choices=("rfc9989", "legacy"))
    store = section.string("store", "")
    if store and not (store.startswith(("sqlite:///", "postgresql://", "postgres://", "/"))):
        raise section.error("store", "expected an absolute SQLite path, sqlite:///PATH (an "
                                     "absolute path) or postgresql://...")
    reports: dict[str, Any] = {}
    reports_section = section.section("reports")
    if reports_section is not None:
        reports["org_name"] = reports_section.string("org_name", required=True)
        reports["email"] = reports_section.string("email", required=True)
        reports["extra_contact_info"] = reports_section.string("extra_contact_info", "")
        reports["smarthost"] = reports_section.optional_str("smarthost")
        reports["mail_from"] = reports_section.string("mail_from", reports["email"])
        reports["directory"] = reports_section.optional_str("directory")
        if not reports["smarthost"] and not reports["directory"]:
            raise reports_section.error(None, "give a smarthost (HOST:PORT) or a directory")
        reports_section.finish()
    section.finish()
    return DmarcConfig(mode, store, reports)


def _signing(top: Section) -> SigningConfig:
    """signing: the key table (loaded and checked now, never at the first message)."""
    from mailwarden.dkim.keys import ALGORITHMS, KeyError_, load_key
    from mailwarden.dkim.sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN

    section = top.section("signing")
    if section is None:
        return SigningConfig((), DEFAULT_HEADERS, DEFAULT_OVERSIGN)
    allow_readable = section.boolean("allow_group_readable_keys", False)
    keys = []
    for path, node in section.sequence("keys"):
        entry = as_section(node, top.file, path)
        domain = entry.parsed("domain", "", _domain) if entry.has("domain") else ""
        if not domain:
            raise entry.error("domain", "is required")
        if not entry.has("selector"):
            raise entry.error("selector", "is required")
        selector = entry.raw("selector")  # as written: 2024.10 is not the number 2024.1
        if not re.fullmatch(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", selector):
            raise entry.error("selector", f"not a valid selector: {selector!r}")
        key_path = entry.string("key", required=True)
        algorithm = entry.optional_str("algorithm")
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise entry.error("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        try:
            keys.append(load_key(domain, selector, key_path, algorithm,
                                 allow_group_readable=allow_readable))
        except KeyError_ as exc:
            raise entry.error("key", str(exc)) from None
        entry.finish()
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
                         parent_domains)


def _octal_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f"expected an octal mode such as 0660, not {text!r}")
    return int(text, 8)


def _rule(section: Section, stage: str, config: Config, checks: Mapping[str, Any]) -> RuleConfig:
    line = _line(section.node)
    name = section.string("name", required=True)
    check_name = section.string("check", required=True, choices=tuple(sorted(checks)))
    check = checks[check_name]
    if stage not in check.stages:
        raise section.error("check", f"{check_name!r} runs at stage(s) "
                                     f"{', '.join(check.stages)}, not {stage}")
    when = None
    when_section = section.section("when")
    if when_section is not None:
        when = _condition(when_section, config)
    on: dict[str, Outcome] = {}
    on_section = section.section("on")
    if on_section is not None:
        for result in on_section.names():
            if result not in check.results:
                raise on_section.key_error(result, f"{check_name} has no result {result!r} "
                                               f"(results: {', '.join(check.results)})")
            on[result] = _outcome(on_section, result)
        on_section.finish()
    mode = section.string("mode", config.mode, choices=MODES)
    args = check.parse_args(section, config)
    section.finish()
    return RuleConfig(name, stage, check_name, args, when, on, line, mode)


def _outcome(parent: Section, result: str) -> Outcome:
    node = parent.node_of(result)
    if isinstance(node, yaml.ScalarNode):
        action = parent.string(result, choices=ACTIONS)
        return Outcome(action)
    section = as_section(node, parent.file, parent.key(result))
    action = section.string("action", required=True, choices=ACTIONS)
    code = section.integer("code", 0, minimum=200, maximum=599) if section.has("code") else None
    status = section.parsed("status", None, parse_status) if section.has("status") else None
    text = section.optional_str("text")
    if text is not None and not all(" " <= ch <= "~" for ch in text):
        raise section.error("text", "must be printable ASCII")
    if (code or status) and action not in ("reject", "tempfail"):
        raise section.error("code" if code else "status",
                            "a reply code only goes with reject or tempfail")
    if code is not None and status is not None and str(code)[0] != status[0]:
        raise section.error("status", f"class of {status} does not match the code {code}")
    if status is not None and action in ("reject", "tempfail") and \
            status[0] != ("4" if action == "tempfail" else "5"):
        raise section.error("status", f"{status} does not suit {action}")
    if action == "tempfail" and code is not None and code // 100 != 4:
        raise section.error("code", "a tempfail reply must be 4xx")
    if action == "reject" and code is not None and code // 100 != 5:
        raise section.error("code", "a reject reply must be 5xx")
    section.finish()
    return Outcome(action, code, status, text)


def _condition(section: Section, config: Config) -> Condition:
    groups = section.str_list("client_in")
    for group in groups:
        if group not in config.hosts:
            raise section.error("client_in", f"no host group named {group!r} in hosts:")
    authenticated = None
    if section.has("authenticated"):
        authenticated = section.boolean("authenticated", False)
    sender = tuple(_domain_or_ours(section, "sender_domain_in"))
    rcpt = tuple(_domain_or_ours(section, "rcpt_domain_in"))
    negate = None
    not_section = section.section("not")
    if not_section is not None:
        negate = _condition(not_section, config)
    section.finish()
    return Condition(groups, authenticated, sender, rcpt, negate)


def _domain_or_ours(section: Section, name: str) -> list[str]:
    """Domain lists accept the word `ours` for the configured `domains:`."""
    out = []
    for text in section.str_list(name):
        if text == "ours":
            out.append(text)
            continue
        try:
            out.append(_domain(text))
        except ValueError as exc:
            raise section.error(name, str(exc)) from None
    return out


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="mailwarden[%(process)d]: %(levelname)s %(message)s", force=True)
