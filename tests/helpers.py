"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from mailwarden.devtools.devdns import DevDNSServer
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


def _probable_prime(n: int) -> bool:
    for small in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % small == 0:
            return n == small
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(32):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % 65537 and _probable_prime(candidate):
            return candidate


def weak_rsa_key(bits: int = 512) -> rsa.RSAPrivateKey:
    """An RSA key under 1024 bits, which `cryptography` refuses to generate itself."""
    p, q = _prime(bits // 2), _prime(bits // 2)
    d = pow(65537, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                    rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(65537, p * q))
    return numbers.private_key()
