"""Every command's --help says what it does, what its exit status means, and every option's
meaning and default (issue 15 #6): the parser is walked, so a new option without a help text
or with an unstated default fails here."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from mailwarden.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: str = "mailwarden"
             ) -> Iterator[tuple[str, argparse.ArgumentParser, bool]]:
    """(command path, parser, whether it is a leaf that runs something)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, not groups
    for group in groups:
        for name, sub in group.choices.items():
            yield from commands(sub, f"{path} {name}")


def test_every_command_describes_itself() -> None:
    problems = []
    for path, parser, leaf in commands(build_parser()):
        if not parser.description:
            problems.append(f"{path}: no description")
        elif leaf and "Exit status" not in parser.description:
            problems.append(f"{path}: the description does not give the exit status")
    assert not problems, "\n".join(problems)


def test_every_option_says_what_it_is_and_its_default() -> None:
    problems = []
    for path, parser, _ in commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction |
                          argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help:
                problems.append(f"{path} {name}: no help text")
                continue
            stated = action.default not in (None, False, "", []) and not action.required
            if stated and action.nargs not in ("*", "?") and "default" not in action.help:
                problems.append(f"{path} {name}: default {action.default!r} not stated")
    assert not problems, "\n".join(problems)


def test_commands_that_read_the_configuration_take_config() -> None:
    """One name per concept: every command reading the configuration takes --config."""
    readers = {"mailwarden run", "mailwarden test", "mailwarden check-config",
               "mailwarden dkim genkey", "mailwarden dkim check-dns", "mailwarden dmarc report",
               "mailwarden dmarc failures", "mailwarden dmarc ingest", "mailwarden dmarc sources",
               "mailwarden dmarc summary"}
    found = {path for path, parser, _ in commands(build_parser())
             if any("--config" in a.option_strings for a in parser._actions)}
    assert found == readers
