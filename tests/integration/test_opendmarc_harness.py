"""Self-test of the OpenDMARC harness (opendmarc.py): Debian's OpenDMARC, in its private mount
namespace, resolves from the loopback DNS server on port 53 of its own 127.53.x.y address, checks
SPF itself and trusts upstream Authentication-Results by authserv-id; driven through
benchmarks/milterload.py's MilterClient. One pass, one fail, one forged (untrusted) DKIM pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from milterload import MilterClient, MilterResult, make_message
from opendmarc import OpenDMARC, loopback_dns_host, namespace_problem, opendmarc_available

from mailwarden.devtools.devdns import DevDNSServer

pytestmark = [
    pytest.mark.skipif(not opendmarc_available(),
                       reason="OpenDMARC is not installed (/usr/sbin/opendmarc; Debian package "
                              "'opendmarc')"),
    pytest.mark.skipif(opendmarc_available() and namespace_problem() is not None,
                       reason=f"OpenDMARC cannot be given a private resolv.conf: "
                              f"{namespace_problem() if opendmarc_available() else ''}"),
]

DOMAIN = "example.org"
AUTHSERV = "mx.test.example"
GOOD_IP = "192.0.2.1"  # in the SPF record
BAD_IP = "198.51.100.7"  # not in it: spf=fail
ZONE = {
    DOMAIN: [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    f"_dmarc.{DOMAIN}": [{"TXT": "v=DMARC1; p=reject"}],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DevDNSServer]:
    with DevDNSServer(ZONE, host=loopback_dns_host(), port=53) as server:
        yield server


@pytest.fixture(scope="module")
def odm(dns: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDMARC]:
    with OpenDMARC(tmp_path_factory.mktemp("opendmarc"), dns=(dns.host, dns.port),
                   authserv_id=AUTHSERV) as instance:
        yield instance


def send(odm: OpenDMARC, client_ip: str, message: bytes) -> MilterResult:
    with MilterClient(odm.socket, timeout=15) as client:
        return client.send_message(client_ip=client_ip, helo="client.example.org",
                                   mail_from=f"alice@{DOMAIN}", rcpts=["bob@example.net"],
                                   message=message)


def results(result: MilterResult) -> list[str]:
    return [v for n, v in result.headers_added if n.lower() == "authentication-results"]


def dkim_ar(authserv: str) -> bytes:
    return (f"Authentication-Results: {authserv};\r\n\tdkim=pass (2048-bit key; unprotected) "
            f"header.d={DOMAIN} header.i=@{DOMAIN} header.a=rsa-sha256 header.s=sel "
            f"header.b=AbCdEfGh;\r\n\tdkim-atps=neutral\r\n").encode()


def test_pass_with_spf_and_trusted_dkim_result(odm: OpenDMARC, dns: DevDNSServer) -> None:
    dns.clear_log()
    message = dkim_ar(AUTHSERV) + make_message(2048, from_addr=f"alice@{DOMAIN}")
    result = send(odm, GOOD_IP, message)
    assert result.action == "accept", (result, odm.diagnostics())
    fields = results(result)
    assert fields == [f"{AUTHSERV}; spf=pass smtp.mailfrom={DOMAIN}",
                      f"{AUTHSERV}; dmarc=pass (p=reject dis=none) header.from={DOMAIN}"], result
    assert all(m[0] == "i" and m[1] == 0 for m in result.modifications)  # inserted on top
    asked = {(name, kind) for name, kind, _ in dns.queries}
    # both lookups went to the loopback server: libopendmarc's and libspf2's
    assert (f"_dmarc.{DOMAIN}", "TXT") in asked and (DOMAIN, "TXT") in asked, dns.queries
    assert "127.53." not in Path("/etc/resolv.conf").read_text()  # the system file is untouched
    if odm.log_text():  # syslog captured through the namespace's /dev/log
        assert odm.wait_for_log(r"pass")


def test_fail_without_dkim_and_with_spf_fail(odm: OpenDMARC) -> None:
    result = send(odm, BAD_IP, make_message(2048, from_addr=f"alice@{DOMAIN}"))
    assert result.action == "continue", result  # RejectFailures is off: not refused
    assert results(result) == [
        f"{AUTHSERV}; spf=fail smtp.mailfrom={DOMAIN}",
        f"{AUTHSERV}; dmarc=fail (p=reject dis=none) header.from={DOMAIN}"], result


def test_untrusted_dkim_result_is_ignored(odm: OpenDMARC) -> None:
    message = dkim_ar("forger.example") + make_message(2048, from_addr=f"alice@{DOMAIN}")
    result = send(odm, BAD_IP, message)
    assert any("dmarc=fail" in v for v in results(result)), result
