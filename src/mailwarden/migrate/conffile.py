"""Reading OpenDKIM's and OpenDMARC's configuration files (opendkim.conf(5),
opendmarc.conf(5)): `Name value` lines, `#` comments, names case-insensitive; data sets
named by a value (`file:PATH`, `refile:PATH`, `csl:a,b`, or a bare path); and the tables
and host lists those data sets hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ImportError_(Exception):
    """A file the import needs cannot be read or makes no sense: named, with its line."""


@dataclass
class Settings:
    """One configuration file: its settings by lower-cased name, each with its line, and
    which of them the conversion used."""

    path: str
    values: dict[str, tuple[str, int]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # lower-cased -> as written
    used: set[str] = field(default_factory=set)

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self.values.get(name.lower())
        if found is None:
            return default
        self.used.add(name.lower())
        return found[0]

    def flag(self, name: str, default: bool) -> bool:
        """opendkim.conf(5) booleans: yes/true/1 and no/false/0, any case."""
        value = self.get(name)
        if value is None:
            return default
        return value.strip().lower() in ("yes", "true", "1", "on")

    def unused(self) -> list[tuple[str, str, int]]:
        """(name as written, value, line) of every setting the conversion did not read."""
        return [(self.names[key], value, line) for key, (value, line) in self.values.items()
                if key not in self.used]


def name_value(line: str) -> tuple[str, str]:
    """`Name value`: the first word, and the rest (either may be separated by spaces or tabs,
    as opendkim.conf(5) and the data set files allow)."""
    name, *rest = line.split(None, 1)
    return name, rest[0] if rest else ""


def read_settings(path: str) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ImportError_(f"cannot read {path}: {exc.strerror}") from None
    settings = Settings(path)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, value = name_value(line)
        settings.values[name.lower()] = (value.strip(), number)
        settings.names[name.lower()] = name
    return settings


@dataclass(frozen=True)
class DataSet:
    """A data set value: its kind (`file`, `refile`, `csl`) and its lines as (text, where)."""

    kind: str
    source: str  # the file's path, or "" for csl
    lines: tuple[tuple[str, str], ...]


KINDS = ("file", "refile", "csl", "db", "dsn", "ldap", "ldaps", "ldapi", "lua", "memcache",
         "redis", "erlang", "mdb", "socket")


def data_set(value: str, origin: str) -> DataSet:
    """`file:/p`, `refile:/p`, `csl:a,b`; without a prefix, a path when it starts with `/`,
    else a comma-separated list (opendkim.conf(5), DATA SETS). `origin` names the setting for
    errors. Other kinds (db:, ldap:, dsn:, lua:, ...) cannot be imported."""
    kind, colon, rest = value.partition(":")
    if not colon or kind.lower() not in KINDS:
        kind, rest = ("file" if value.startswith("/") else "csl"), value
    kind = kind.lower()
    if kind == "csl":
        items = [item.strip() for item in rest.split(",") if item.strip()]
        return DataSet("csl", "", tuple((item, origin) for item in items))
    if kind not in ("file", "refile"):
        raise ImportError_(f"{origin}: a {kind}: data set cannot be imported; "
                           "export it to a file first")
    try:
        text = Path(rest).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ImportError_(f"{origin}: cannot read {rest}: {exc.strerror}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append((line, f"{rest}:{number}"))
    return DataSet(kind, rest, tuple(lines))
