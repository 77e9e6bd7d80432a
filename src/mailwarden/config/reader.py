"""The YAML node reader: typed getters over one mapping that record the keys read, and errors
that name the file, the line and the key path (`rules.mail[1].policy`); unknown keys are
errors, so that a typo never silently turns a check off."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


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


DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def domain_name(text: str) -> str:
    """A domain name, lower-cased, without a trailing dot; a ValueError if it is none."""
    name = text.lower().rstrip(".")
    if not DOMAIN.match(name):
        raise ValueError(f"not a domain name: {text!r}")
    return name
