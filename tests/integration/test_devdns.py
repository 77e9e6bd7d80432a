"""Tests of the in-memory development DNS server, using plain dnspython clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from mailwarden.devtools.devdns import DevDNSServer, load_zone_file

ZONE: dict[str, Any] = {
    "Example.COM.": [
        {"A": "192.0.2.1"},
        {"AAAA": "2001:db8::1"},
        {"MX": [10, "mx.example.com"]},
        {"TXT": "v=spf1 -all"},
        {"TXT": ["v=spf1 ", "ip4:192.0.2.0/24 ", "-all"]},
    ],
    "1.2.0.192.in-addr.arpa": [{"PTR": "host.example.com"}],
    "long.example.com": [{"TXT": "x" * 300}, {"TXT": "é"}, {"TXT": 42}],
    "ttl.example.com": [{"A": "192.0.2.9", "ttl": 5}],
    "spfonly.example.com": [{"SPF": "v=spf1 a -all"}],
    "spfnotxt.example.com": [{"SPF": "v=spf1 a -all"}, {"TXT": "NONE"}],
    "nullspf.example.com": [{"SPF": []}],
    "timeout.example.com": [{"TXT": "v=spf1 -all"}, "TIMEOUT", {"A": "192.0.2.7"}],
    "servfail.example.com": [{"A": "192.0.2.2"}, "SERVFAIL"],
    "refused.example.com": ["REFUSED"],
    "secure.example.com": ["AD", {"A": "192.0.2.3"}, {"CNAME": "secure2.example.com"}],
    "secure2.example.com": [{"A": "192.0.2.4"}, "AD"],
    "alias.example.com": [{"CNAME": "alias2.example.com"}],
    "alias2.example.com": [{"CNAME": "example.com"}],
    "dangling.example.com": [{"CNAME": "nowhere.example.com"}],
    "loop1.example.com": [{"CNAME": "loop2.example.com"}],
    "loop2.example.com": [{"CNAME": "loop1.example.com"}],
    "toslow.example.com": [{"CNAME": "timeout.example.com"}],
    "big.example.com": [{"TXT": f"{i:03d}" + "y" * 197} for i in range(20)],
}


@pytest.fixture(scope="module")
def server() -> Iterator[DevDNSServer]:
    with DevDNSServer(ZONE, negative_ttl=60) as srv:
        yield srv


def ask(
    srv: DevDNSServer, name: str, rdtype: str, *, tcp: bool = False, **kw: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return dns.query.tcp(query, srv.host, port=srv.port, timeout=2)
    return dns.query.udp(query, srv.host, port=srv.port, timeout=2)


def rdata_texts(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def txt_strings(response: dns.message.Message) -> list[tuple[bytes, ...]]:
    return sorted(tuple(rd.strings) for rrset in response.answer for rd in rrset)


def test_basic_record_types(server: DevDNSServer) -> None:
    assert rdata_texts(ask(server, "example.com", "A")) == ["192.0.2.1"]
    assert rdata_texts(ask(server, "EXAMPLE.com.", "AAAA")) == ["2001:db8::1"]
    assert rdata_texts(ask(server, "example.com", "MX")) == ["10 mx.example.com."]
    ptr = ask(server, "1.2.0.192.in-addr.arpa", "PTR")
    assert rdata_texts(ptr) == ["host.example.com."]
    resp = ask(server, "example.com", "A")
    assert resp.flags & dns.flags.QR and resp.flags & dns.flags.RA
    assert not resp.flags & (dns.flags.AA | dns.flags.AD | dns.flags.TC)
    assert resp.answer[0].ttl == 300
    assert ask(server, "ttl.example.com", "A").answer[0].ttl == 5


def test_txt_strings(server: DevDNSServer) -> None:
    assert txt_strings(ask(server, "example.com", "TXT")) == [
        (b"v=spf1 ", b"ip4:192.0.2.0/24 ", b"-all"),
        (b"v=spf1 -all",),
    ]
    long = txt_strings(ask(server, "long.example.com", "TXT"))
    assert long == sorted([(b"x" * 255, b"x" * 45), ("é".encode(),), (b"42",)])


def test_negative_answers_carry_soa(server: DevDNSServer) -> None:
    nx = ask(server, "missing.sub.example.com", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    soa = nx.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.com."
    assert soa.ttl == 60 and soa[0].minimum == 60 and soa[0].serial == 1
    assert soa[0].mname.to_text() == "ns.devdns.invalid."
    nodata = ask(server, "1.2.0.192.in-addr.arpa", "TXT")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].name.to_text() == "in-addr.arpa."


def test_timeout_drops_only_unlisted_types(server: DevDNSServer) -> None:
    assert txt_strings(ask(server, "timeout.example.com", "TXT")) == [(b"v=spf1 -all",)]
    for name, rdtype in [("timeout.example.com", "A"), ("toslow.example.com", "A")]:
        query = dns.message.make_query(name, rdtype)
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(query, server.host, port=server.port, timeout=0.3)


def test_servfail_and_refused(server: DevDNSServer) -> None:
    assert rdata_texts(ask(server, "servfail.example.com", "A")) == ["192.0.2.2"]
    assert ask(server, "servfail.example.com", "TXT").rcode() == dns.rcode.SERVFAIL
    assert ask(server, "refused.example.com", "A").rcode() == dns.rcode.REFUSED


def test_ad_flag(server: DevDNSServer) -> None:
    assert ask(server, "secure2.example.com", "A").flags & dns.flags.AD
    assert ask(server, "secure2.example.com", "MX").flags & dns.flags.AD  # NODATA
    assert not ask(server, "example.com", "A").flags & dns.flags.AD
    chain = ask(server, "secure.example.com", "A")  # CNAME wins, all names AD
    assert rdata_texts(chain) == ["192.0.2.4", "secure2.example.com."]
    assert chain.flags & dns.flags.AD
    assert not ask(server, "alias.example.com", "A").flags & dns.flags.AD


def test_cname_chain(server: DevDNSServer) -> None:
    resp = ask(server, "alias.example.com", "A")
    assert [rrset.rdtype for rrset in resp.answer] == [
        dns.rdatatype.CNAME,
        dns.rdatatype.CNAME,
        dns.rdatatype.A,
    ]
    assert rdata_texts(resp) == ["192.0.2.1", "alias2.example.com.", "example.com."]
    direct = ask(server, "alias.example.com", "CNAME")
    assert rdata_texts(direct) == ["alias2.example.com."]
    dangling = ask(server, "dangling.example.com", "A")
    assert dangling.rcode() == dns.rcode.NXDOMAIN
    assert rdata_texts(dangling) == ["nowhere.example.com."]
    loop = ask(server, "loop1.example.com", "A")
    assert loop.rcode() == dns.rcode.NOERROR and len(loop.answer) == 2


def test_spf_duplicated_as_txt(server: DevDNSServer) -> None:
    assert txt_strings(ask(server, "spfonly.example.com", "TXT")) == [(b"v=spf1 a -all",)]
    assert txt_strings(ask(server, "spfonly.example.com", "SPF")) == [(b"v=spf1 a -all",)]
    none = ask(server, "spfnotxt.example.com", "TXT")
    assert none.rcode() == dns.rcode.NOERROR and not none.answer
    assert txt_strings(ask(server, "nullspf.example.com", "SPF")) == [(b"",)]
    with DevDNSServer(ZONE, spf_as_txt=False) as plain:
        assert not ask(plain, "spfonly.example.com", "TXT").answer


def test_truncation_over_udp_full_over_tcp(server: DevDNSServer) -> None:
    udp = ask(server, "big.example.com", "TXT")
    assert udp.flags & dns.flags.TC and not udp.answer and not udp.authority
    tcp = ask(server, "big.example.com", "TXT", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 20
    edns = ask(server, "example.com", "TXT", use_edns=0, payload=1232)
    assert edns.edns == 0 and edns.payload == 1232 and len(edns.answer[0]) == 2


def test_tcp_connection_reuse(server: DevDNSServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        for name in ("example.com", "ttl.example.com", "missing.example.com"):
            query = dns.message.make_query(name, "A")
            resp = dns.query.tcp(query, server.host, port=server.port, timeout=2, sock=sock)
            assert resp.id == query.id


def test_query_log(server: DevDNSServer) -> None:
    server.clear_log()
    ask(server, "Example.COM.", "TXT")
    ask(server, "1.2.0.192.in-addr.arpa", "PTR", tcp=True)
    assert server.queries == [
        ("example.com", "TXT", "udp"),
        ("1.2.0.192.in-addr.arpa", "PTR", "tcp"),
    ]
    server.clear_log()
    assert server.queries == []


def test_malformed_queries_do_not_kill_server(server: DevDNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(b"\x12\x34" + b"\x00\x00\x00\x05" + b"\xff" * 10, (server.host, server.port))
        reply, _ = sock.recvfrom(512)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
        sock.sendto(b"\x01", (server.host, server.port))
    assert rdata_texts(ask(server, "example.com", "A")) == ["192.0.2.1"]


def test_load_replaces_zone() -> None:
    with DevDNSServer({"a.example": [{"A": "192.0.2.1"}]}) as srv:
        ask(srv, "a.example", "A")
        srv.load({"b.example": [{"A": "192.0.2.2"}]})
        assert ask(srv, "a.example", "A").rcode() == dns.rcode.NXDOMAIN
        assert rdata_texts(ask(srv, "b.example", "A")) == ["192.0.2.2"]
        assert len(srv.queries) == 3
    srv.stop()  # idempotent


def test_delay_is_concurrent() -> None:
    with DevDNSServer({"a.example": [{"A": "192.0.2.1"}]}) as srv:
        srv.delay = 0.2
        results: list[float] = []

        def one() -> None:
            started = time.monotonic()
            ask(srv, "a.example", "A")
            results.append(time.monotonic() - started)

        threads = [threading.Thread(target=one) for _ in range(5)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 5 and min(results) >= 0.19
        assert time.monotonic() - started < 0.6


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = DevDNSServer({"a.example": [{"AAAA": "2001:db8::5"}]}, host="::1")
        srv.start()
    except OSError:
        pytest.skip("::1 not available")
    with srv:
        assert rdata_texts(ask(srv, "a.example", "AAAA")) == ["2001:db8::5"]
        assert rdata_texts(ask(srv, "a.example", "AAAA", tcp=True)) == ["2001:db8::5"]


def test_load_zone_file(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("example.com:\n  - A: 1.2.3.4\n", encoding="utf-8")
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text("description: x\nzonedata:\n  example.com:\n    - TIMEOUT\n")
    assert load_zone_file(bare) == {"example.com": [{"A": "1.2.3.4"}]}
    assert load_zone_file(str(wrapped)) == {"example.com": ["TIMEOUT"]}


def test_cli(tmp_path: Path) -> None:
    zone = tmp_path / "zone.yaml"
    zone.write_text('cli.example:\n  - TXT: "hello"\n', encoding="utf-8")
    src = Path(__file__).resolve().parents[2] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwarden.devtools.devdns", str(zone), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("devdns listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        query = dns.message.make_query("cli.example", "TXT")
        resp = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
        assert txt_strings(resp) == [(b"hello",)]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
