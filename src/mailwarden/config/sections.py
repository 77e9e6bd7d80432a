"""The small top-level sections, each read by one function: `hosts`, `limits`, `metrics`,
`log`."""

from __future__ import annotations

from pathlib import Path

import yaml

from mailwarden.config.model import LIMIT_RANGES, LOG_FACILITIES, LimitsConfig, LogConfig, LogTarget
from mailwarden.config.reader import ConfigError, Section, _line
from mailwarden.relay import check_host_entry


def limits_section(top: Section) -> LimitsConfig:
    """limits: every key is read, given or not, so that each default comes from one place."""
    section = top.section("limits")
    if section is None:
        empty = yaml.MappingNode("tag:yaml.org,2002:map", [])
        section = Section(empty, top.file, top.key("limits"))
    defaults = LimitsConfig()
    values: dict[str, int] = {}
    for name, minimum, maximum, why in LIMIT_RANGES:
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


def metrics(top: Section) -> str:
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


def log_section(top: Section) -> LogConfig:
    """log: where the lines go (`target`), with which syslog facility, through which socket."""
    section = top.section("log")
    if section is None:
        return LogConfig()
    target = LogTarget(section.string("target", "stderr", choices=tuple(LogTarget)))
    facility = section.string("facility", "mail", choices=LOG_FACILITIES)
    address = section.optional_str("address") or ""
    if address and not address.startswith("/"):
        raise section.error("address", "must be the absolute path of a unix socket")
    if address and target is LogTarget.STDERR:
        raise section.error("address", "is for target syslog or journal")
    section.finish()
    return LogConfig(target, facility, address)


def hosts_section(top: Section) -> dict[str, tuple[str, ...]]:
    """hosts: named groups of addresses, CIDR ranges and host names; `!` excludes, and
    `file:/PATH` reads more entries from a file, one per line (`#` comments), as OpenDKIM's
    InternalHosts and ExternalIgnoreList files are written."""
    hosts: dict[str, tuple[str, ...]] = {}
    section = top.section("hosts")
    if section is None:
        return hosts
    for name in section.names():
        key, line = section.key(name), _line(section.node_of(name))
        entries: list[str] = []
        for index, entry in enumerate(section.str_list(name)):
            where = (top.file, line, f"{key}[{index}]")
            if entry.startswith("file:"):
                entries += _entries_file(entry.removeprefix("file:"), where)
                continue
            problem = check_host_entry(entry)
            if problem:
                raise ConfigError(*where, problem)
            entries.append(entry)
        hosts[name] = tuple(entries)
    section.finish()
    return hosts


def _entries_file(path: str, where: tuple[str, int, str]) -> list[str]:
    """The entries of a host list file; an error names the file and its line."""
    if not path.startswith("/"):
        raise ConfigError(*where, f"file:{path}: must be an absolute path")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(*where, f"cannot read {path}: {reason}") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        problem = check_host_entry(entry)
        if problem:
            raise ConfigError(path, number, where[2], problem)
        entries.append(entry)
    return entries

