"""YAML configuration to a typed, frozen `Config` (`config.model`), through the node reader
(`config.reader`). Check-specific arguments are validated by the check itself
(`mailwarden.checks`), through the same `Section` reader."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mailwarden.checks import CHECKS
from mailwarden.config.model import (
    ACTIONS,
    LOG_LEVELS,
    MODES,
    STAGES,
    TRANSPORTS,
    Condition,
    Config,
    DmarcConfig,
    DNSConfig,
    FailureReportsConfig,
    Outcome,
    RuleConfig,
    default_workers,
)
from mailwarden.config.reader import DOMAIN, ConfigError, Section, _line, as_section, domain_name
from mailwarden.config.sections import hosts_section, limits_section, log_section, metrics
from mailwarden.config.signing import signing_section
from mailwarden.dns import Nameserver, parse_nameserver
from mailwarden.results import Result
from mailwarden.verdict import Action, Mode, Stage

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")


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
            if not DOMAIN.match(host):
                raise ValueError(f"bad host in {text!r}") from None
    return f"{kind}:{port}@{host}" if host else f"{kind}:{port}"


def parse_status(text: str) -> str:
    if not _STATUS.match(text):
        raise ValueError(f"not an RFC 3463 enhanced status code: {text!r}")
    return text


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
    listen = top.parsed("listen", "inet:8894@127.0.0.1", parse_listen)
    authserv_id = top.parsed("authserv_id", "", domain_name) if top.has("authserv_id") else ""
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
            domains.append(domain_name(text))
        except ValueError as exc:
            raise ConfigError(top.file, _line(top.node_of("domains")), f"domains[{index}]",
                              str(exc)) from None

    hosts = hosts_section(top)

    signing = signing_section(top)
    spool_threshold = top.integer("spool_threshold", 1024 * 1024, minimum=0,
                                  maximum=1024 * 1024 * 1024)
    dmarc = _dmarc(top)
    socket_group = top.optional_str("socket_group")
    spool_directory = top.optional_str("spool_directory")
    if spool_directory is not None and not spool_directory.startswith("/"):
        raise top.error("spool_directory", "must be an absolute path")
    mode = Mode(top.string("mode", "enforce", choices=MODES))
    metrics_listen = metrics(top)
    limits = limits_section(top)
    log = log_section(top)
    transport = top.string("transport", "libmilter", choices=TRANSPORTS)
    progress_interval = top.number("progress_interval", 5.0, minimum=0.2, maximum=60)
    stage_budget = top.number("stage_budget", 25.0, minimum=0.5, maximum=600)
    partial = Config(top.file, listen, authserv_id, user, group, socket_mode, log_level, workers,
                     drain_timeout, dns, spf_budget, frozenset(domains), hosts, {}, signing,
                     spool_threshold, dmarc, mode, metrics_listen, limits, socket_group,
                     spool_directory, transport, progress_interval, stage_budget, log)
    rules: dict[Stage, tuple[RuleConfig, ...]] = {}
    rules_section = top.section("rules")
    if rules_section is not None:
        for stage in rules_section.names():
            if stage not in STAGES:
                raise rules_section.key_error(stage,
                                              f"unknown stage (stages: {', '.join(STAGES)})")
            parsed: list[RuleConfig] = []
            names: set[str] = set()
            for path, node in rules_section.sequence(stage):
                rule = _rule(as_section(node, top.file, path), Stage(stage), partial, CHECKS)
                if rule.name in names:
                    raise ConfigError(top.file, rule.line, path,
                                      f"duplicate rule name {rule.name!r}")
                names.add(rule.name)
                parsed.append(rule)
            rules[Stage(stage)] = tuple(parsed)
        rules_section.finish()
    top.finish()
    return dataclasses.replace(partial, rules=rules)


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
        reports["include_internal_sources"] = reports_section.boolean(
            "include_internal_sources", False)
        if not reports["smarthost"] and not reports["directory"]:
            raise reports_section.error(None, "give a smarthost (HOST:PORT) or a directory")
        reports_section.finish()
    failures = _failure_reports(section, store, reports)
    section.finish()
    return DmarcConfig(mode, store, reports, failures)


def _failure_reports(dmarc: Section, store: str,
                     reports: dict[str, Any]) -> FailureReportsConfig | None:
    """dmarc.failure_reports: queued in the store, sent the way aggregate reports are."""
    section = dmarc.section("failure_reports")
    if section is None:
        return None
    if not store:
        raise section.error(None, "failure reports are queued in dmarc.store: set it")
    if not reports or not reports.get("smarthost"):
        raise section.error(None, "failure reports are mailed with the dmarc.reports settings: "
                                  "set dmarc.reports with a smarthost")
    rate = section.integer("rate_limit", 10, minimum=1)
    domains = tuple(d.lower().rstrip(".") for d in section.str_list("domains"))
    redact = section.boolean("redact", True)
    section.finish()
    return FailureReportsConfig(rate, domains, redact)


def _octal_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f"expected an octal mode such as 0660, not {text!r}")
    return int(text, 8)


def _rule(section: Section, stage: Stage, config: Config,
          checks: Mapping[str, Any]) -> RuleConfig:
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
    on: dict[Result, Outcome] = {}
    on_section = section.section("on")
    if on_section is not None:
        for word in on_section.names():
            result = next((r for r in check.results if r.value == word), None)
            if result is None:
                raise on_section.key_error(word, f"{check_name} has no result {word!r} "
                                             f"(results: {', '.join(check.results)})")
            on[result] = _outcome(on_section, word)
        on_section.finish()
    mode = Mode(section.string("mode", str(config.mode), choices=MODES))
    args = check.parse_args(section, config)
    section.finish()
    return RuleConfig(name, stage, check_name, args, when, on, line, mode)


def _outcome(parent: Section, result: str) -> Outcome:
    node = parent.node_of(result)
    if isinstance(node, yaml.ScalarNode):
        action = parent.string(result, choices=ACTIONS)
        return Outcome(Action(action))
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
    return Outcome(Action(action), code, status, text)


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
            out.append(domain_name(text))
        except ValueError as exc:
            raise section.error(name, str(exc)) from None
    return out


