"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any

from mailwarden.devdns import DevDNSServer
from mailwarden.dns import Nameserver, Resolver

# suite name -> test id -> passed; printed at the end of the run by conftest.py
SUITE_SCORE: dict[str, dict[str, bool]] = {}


def make_resolver(server: DevDNSServer, **kwargs: Any) -> Resolver:
    """A resolver that asks only `server`, with short timeouts so TIMEOUT cases stay quick."""
    options: dict[str, Any] = {"timeout": 0.25, "lifetime": 0.6}
    options.update(kwargs)
    return Resolver(nameservers=[Nameserver(server.host, server.port)], **options)
