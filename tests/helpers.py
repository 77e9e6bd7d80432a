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


def open_concurrently(url: str, count: int) -> tuple[list[str], list[BaseException]]:
    """Open the DMARC store at `url` from `count` threads at once: the instance ids they saw,
    and any errors (a new store must be created exactly once)."""
    import threading

    from mailwarden.dmarc.store import Store

    barrier = threading.Barrier(count)
    ids: list[str] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            barrier.wait()
            store = Store.open(url)
            ids.append(store.instance_id)
            store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids, errors
