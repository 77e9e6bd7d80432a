"""Interoperability with Debian's OpenDKIM, both ways, RSA and Ed25519, simple and relaxed:
OpenDKIM signs -> mailwarden verifies; mailwarden signs -> OpenDKIM verifies. Both resolve keys
from the same loopback DNS server; OpenDKIM is driven over the milter protocol."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from milterload import MilterClient
from opendkim import OpenDKIM, opendkim_available

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private
from mailwarden.dkim.sign import SignOptions, sign_message
from mailwarden.dkim.verify import verify_message

from helpers import make_resolver

pytestmark = pytest.mark.skipif(not opendkim_available(),
                                reason="Debian's opendkim is not installed")

DOMAIN = "interop.example"
MESSAGE = (
    b"From: Joe SixPack <joe@interop.example>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject:   Is  dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@interop.example>\r\n"
    b"\r\n"
    b"Hi.  \r\n"
    b"\r\n"
    b"We lost   the game. Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n"
)

CASES = [(kind, canon) for kind in ("rsa", "ed25519")
         for canon in ("simple/simple", "relaxed/relaxed", "relaxed/simple")]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    workdir = tmp_path_factory.mktemp("interop-keys")
    found = {}
    for kind in ("rsa", "ed25519"):
        path = workdir / f"{kind}.pem"
        write_private(generate(kind), str(path))
        found[kind] = load_key(DOMAIN, f"sel-{kind}", str(path))
    return found


@pytest.fixture
def dns(dns_server: DevDNSServer, keys: dict[str, SigningKey]) -> Iterator[DevDNSServer]:
    dns_server.load({k.dns_name: [{"TXT": k.public_record}] for k in keys.values()})
    yield dns_server


def _through(odk: OpenDKIM, message: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    with MilterClient(odk.socket, timeout=30) as client:
        result = client.send_message(client_ip="127.0.0.1", helo="client.interop.example",
                                     mail_from=f"joe@{DOMAIN}", rcpts=["suzie@example.net"],
                                     message=message)
    return result.apply(message), list(result.headers_added)


@pytest.mark.parametrize(("kind", "canon"), CASES)
def test_opendkim_signs_mailwarden_verifies(dns: DevDNSServer, keys: dict[str, SigningKey],
                                            tmp_path: Path, kind: str, canon: str) -> None:
    key = keys[kind]
    with OpenDKIM(tmp_path / "odk", mode="s", keys=[(DOMAIN, key.selector, Path(key.path))],
                  dns=("127.0.0.1", dns.port), canonicalization=canon) as odk:
        signed, added = _through(odk, MESSAGE)
    assert any(name.lower() == "dkim-signature" for name, _ in added), added
    results = verify_message(signed, make_resolver(dns))
    if kind == "ed25519" and canon.startswith("simple/"):
        # OpenDKIM 2.11.0~beta2 cannot verify its own Ed25519 signatures made with simple
        # header canonicalization: the interop requirement is then to agree with it.
        with OpenDKIM(tmp_path / "odk-v", mode="v", dns=("127.0.0.1", dns.port)) as odk:
            _, verdict = _through(odk, signed)
        theirs = " ".join(v for n, v in verdict if n.lower() == "authentication-results")
        assert "dkim=fail" in theirs, theirs
        assert [r.result for r in results] == ["fail"], results
        return
    assert [(r.result, r.algorithm, r.domain) for r in results] == [
        ("pass", f"{kind}-sha256", DOMAIN)], results


@pytest.mark.parametrize(("kind", "canon"), CASES)
def test_mailwarden_signs_opendkim_verifies(dns: DevDNSServer, keys: dict[str, SigningKey],
                                            tmp_path: Path, kind: str, canon: str) -> None:
    header, _, body = canon.partition("/")
    fields = sign_message(MESSAGE, [keys[kind]], SignOptions(canonicalization=(header, body)))
    signed = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                      for n, v in fields) + MESSAGE
    with OpenDKIM(tmp_path / "odk", mode="v", dns=("127.0.0.1", dns.port)) as odk:
        _, added = _through(odk, signed)
    verdicts = [v for n, v in added if n.lower() == "authentication-results"]
    assert verdicts, added
    assert "dkim=pass" in verdicts[0], verdicts
    assert f"header.d={DOMAIN}" in verdicts[0]
