"""Shared fixtures: a real DNS server on loopback for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mailwarden.devtools.devdns import DevDNSServer

from helpers import SUITE_SCORE


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DevDNSServer]:
    server = DevDNSServer({}, host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the score of each conformance suite that ran."""
    for suite, outcomes in sorted(SUITE_SCORE.items()):
        passed = sum(outcomes.values())
        failing = sorted(name for name, ok in outcomes.items() if not ok)
        line = f"{suite}: {passed}/{len(outcomes)} tests passed"
        if failing:
            line += " (failing: " + ", ".join(failing) + ")"
        terminalreporter.write_line(line)
