"""Amplification limits (`limits:`), counted at the DNS server: the real daemon, fed over the
milter protocol (benchmarks/milterload.py's MilterClient), resolves through the loopback DNS
server, whose query log says what each hostile message cost.

Every test runs twice: with the default limits, and with every limit lowered, so that each
count is seen to follow its configuration value. The daemon's DNS cache is off, so each lookup
of an evaluation is one query at the server; the counts are of the UDP queries (a truncated
answer would be asked for again over TCP: one lookup).

Measured on 2 cores (lookups of the whole transaction, default / lowered limits): SPF include
fan-out 17 / 12 (of them, the MAIL FROM evaluation's 13 / 8), 50-name MX 6 / 6, 50-name PTR
26 / 13, 100 DKIM signatures 13 / 8, a 3-set ARC chain 11 / 5; 10,000 header fields (268 KB)
0.14-0.22 s, 1,000 lines of 1,000 characters 0.12-0.43 s, two 1 MB fields 0.23-0.27 s, each
with the 5 lookups of a plain message and the worker's memory grown by at most 2 MB."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from daemon import Daemon
from miltercodec import MilterProtocolError
from milterload import MilterClient, MilterResult

from mailwarden.config import LimitsConfig
from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import public_record
from mailwarden.headers import unfold

AUTHSERV = "mx.test.example"
HELO = "client.helo.example"
AUTHOR = "alice@author.example"
LOWERED = {"spf_dns_lookups": 5, "spf_mx_names": 5, "spf_ptr_names": 3, "iprev_names": 4,
           "dkim_signatures": 3, "arc_sets": 2, "header_fields": 200,
           "header_field_bytes": 4096}
PROFILES = {"default": {}, "lowered": LOWERED}
KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
PEM = KEY.private_bytes(serialization.Encoding.PEM,
                        serialization.PrivateFormat.TraditionalOpenSSL,
                        serialization.NoEncryption())
RECORD = public_record(KEY)


# -- the zone ------------------------------------------------------------------------------------
def fan_out_zone() -> dict[str, list[dict[str, Any]]]:
    """fan.example includes b1..b3; each bK has an `a` and an `mx` term (two MX names) and
    includes cK1 and cK2, which have two `a` terms each. Nothing matches the client."""
    zone: dict[str, list[dict[str, Any]]] = {
        "fan.example": [{"TXT": "v=spf1 include:b1.fan.example include:b2.fan.example "
                                "include:b3.fan.example ?all"}]}
    for k in (1, 2, 3):
        zone[f"b{k}.fan.example"] = [{"TXT": f"v=spf1 a:h{k}.fan.example mx:m{k}.fan.example "
                                             f"include:c{k}1.fan.example "
                                             f"include:c{k}2.fan.example -all"}]
        zone[f"h{k}.fan.example"] = [{"A": f"198.51.100.{k}"}]
        zone[f"m{k}.fan.example"] = [{"MX": [10, f"mx{k}1.fan.example"]},
                                     {"MX": [20, f"mx{k}2.fan.example"]}]
        for j in (1, 2):
            zone[f"mx{k}{j}.fan.example"] = [{"A": f"198.51.100.{10 * k + j}"}]
            zone[f"c{k}{j}.fan.example"] = [{"TXT": f"v=spf1 a:x{k}{j}1.fan.example "
                                                    f"a:x{k}{j}2.fan.example -all"}]
            for n in (1, 2):
                zone[f"x{k}{j}{n}.fan.example"] = [{"A": f"198.51.100.{100 + 10 * k + j + n}"}]
    return zone


def fan_out_terms() -> list[list[tuple[str, str]]]:
    """The lookups of each DNS-querying term of fan.example, in evaluation order."""
    terms: list[list[tuple[str, str]]] = []
    for k in (1, 2, 3):
        terms.append([(f"b{k}.fan.example", "TXT")])
        terms.append([(f"h{k}.fan.example", "A")])
        terms.append([(f"m{k}.fan.example", "MX"), (f"mx{k}1.fan.example", "A"),
                      (f"mx{k}2.fan.example", "A")])
        for j in (1, 2):
            terms.append([(f"c{k}{j}.fan.example", "TXT")])
            terms += [[(f"x{k}{j}{n}.fan.example", "A")] for n in (1, 2)]
    return terms


PTR_CLIENT = "192.0.2.50"
PTR_REVERSE = "50.2.0.192.in-addr.arpa"
PTR_NAMES = [f"h{i:02d}.ptr50.example" for i in range(50)]


def zone() -> dict[str, list[Any]]:
    data: dict[str, list[Any]] = {**fan_out_zone()}
    data["mx50.example"] = [{"TXT": "v=spf1 mx ?all"},
                            *({"MX": [i, f"mx{i:02d}.mx50.example"]} for i in range(50))]
    data["mx8.example"] = [{"TXT": "v=spf1 mx ?all"},
                           *({"MX": [i, f"mx{i}.mx8.example"]} for i in range(8))]
    for i in range(50):
        data[f"mx{i:02d}.mx50.example"] = [{"A": f"198.51.100.{i + 1}"}]
    for i in range(8):
        data[f"mx{i}.mx8.example"] = [{"A": f"198.51.100.{i + 1}"}]
    data["ptr50.example"] = [{"TXT": "v=spf1 ptr ?all"}]
    data[PTR_REVERSE] = [{"PTR": name} for name in PTR_NAMES]
    for i, name in enumerate(PTR_NAMES):
        data[name] = [{"A": f"198.51.100.{i + 1}"}]
    for i in range(100):
        data[f"s{i}._domainkey.d{i}.sig.example"] = [{"TXT": RECORD}]
    for i in (1, 2, 3):
        data[f"arc._domainkey.sealer{i}.arc.example"] = [{"TXT": RECORD}]
    return data


# -- the daemon ----------------------------------------------------------------------------------
@dataclass
class Running:
    daemon: Daemon
    limits: LimitsConfig
    dns: DevDNSServer

    def send(self, message: bytes, *, client_ip: str = "192.0.2.10",
             mail_from: str = AUTHOR) -> tuple[MilterResult, list[tuple[str, str]]]:
        """One message on a new connection: the milter's answer, and the lookups it made."""
        self.dns.clear_log()
        with MilterClient(self.daemon.socket) as client:
            result = client.send_message(client_ip=client_ip, helo=HELO, mail_from=mail_from,
                                         rcpts=["bob@mx.test.example"], message=message)
        lookups = [(name, rdtype) for name, rdtype, proto in self.dns.queries
                   if proto == "udp"]
        return result, lookups

    def worker_rss(self) -> int:
        """Resident memory of the (one) worker process, in bytes."""
        assert self.daemon.process is not None
        pid = self.daemon.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, children
        for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def daemon_config(workdir: Path, dns_port: int, limits: dict[str, int],
                  transport: str = "libmilter") -> dict[str, object]:
    config: dict[str, object] = {
        "transport": transport,
        "listen": f"unix:{workdir}/milter.sock",
        "authserv_id": AUTHSERV,
        "workers": 1,
        "drain_timeout": 5,
        "log_level": "info",
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 0.5, "lifetime": 2.0,
                "cache_size": 0},
        "rules": {
            "connect": [{"name": "iprev", "check": "iprev"}],
            "mail": [{"name": "spf", "check": "spf", "header": "auth"}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "arc", "check": "arc_verify"},
                    {"name": "dmarc", "check": "dmarc"}],
        },
    }
    if os.geteuid() == 0:
        config["user"] = "root"  # started as root, the daemon wants to be told so
    if limits:
        config["limits"] = limits
    return config


@pytest.fixture(scope="module", params=[(profile, transport) for profile in sorted(PROFILES)
                                        for transport in ("libmilter", "native")],
                ids=lambda param: "-".join(param))
def running(request: pytest.FixtureRequest, dns_server: DevDNSServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    profile, transport = request.param
    limits = PROFILES[profile]
    dns_server.load(zone())
    workdir = tmp_path_factory.mktemp(f"amplification-{profile}-{transport}")
    with Daemon(workdir, daemon_config(workdir, dns_server.port, limits, transport)) as daemon:
        yield Running(daemon, LimitsConfig(**limits), dns_server)


@pytest.fixture(autouse=True)
def loaded(running: Running) -> None:
    running.dns.load(zone())  # another module may have loaded its own in between


def message(*headers: str, body: bytes = b"Hello.\r\n") -> bytes:
    fields = [*headers, f"From: Alice <{AUTHOR}>", "To: bob@mx.test.example",
              "Subject: amplification", "Date: Sat, 22 Nov 2025 10:00:00 +0000",
              "Message-ID: <amplification@author.example>"]
    return "".join(f"{field}\r\n" for field in fields).encode() + b"\r\n" + body


PLAIN = message()


def our_results(result: MilterResult) -> str:
    values = [value for name, value in result.headers_added
              if name == "Authentication-Results"]
    assert len(values) == 1, result.headers_added
    return unfold(str(values[0]))


def under(lookups: list[tuple[str, str]], domain: str) -> list[tuple[str, str]]:
    """The lookups of names in `domain`, in order."""
    return [(name, rdtype) for name, rdtype in lookups
            if name == domain or name.endswith("." + domain)]


# == SPF =========================================================================================
def test_spf_include_fan_out_stops_at_the_term_limit(running: Running) -> None:
    result, lookups = running.send(PLAIN, mail_from="alice@fan.example")
    assert result.action == "continue"
    assert "spf=permerror smtp.mailfrom=alice@fan.example" in our_results(result)
    limit = running.limits.spf_dns_lookups
    expected = [("fan.example", "TXT")] + [q for term in fan_out_terms()[:limit] for q in term]
    # default: 13 lookups (1 record, 10 terms, the mx term's 2 address lookups);
    # lowered to 5: 8
    assert under(lookups, "fan.example") == expected
    assert len(expected) == {10: 13, 5: 8}[limit]


@pytest.mark.parametrize("domain", ["mx50.example", "mx8.example"])
def test_spf_mx_answer_with_too_many_names_is_a_permerror_without_address_lookups(
        running: Running, domain: str) -> None:
    result, lookups = running.send(PLAIN, mail_from=f"alice@{domain}")
    names = 50 if domain == "mx50.example" else 8
    over = names > running.limits.spf_mx_names
    assert under(lookups, domain) == [(domain, "TXT"), (domain, "MX")] + (
        [] if over else [(f"mx{i}.{domain}", "A") for i in range(names)])
    expected = "permerror" if over else "neutral"
    assert f"spf={expected} smtp.mailfrom=alice@{domain}" in our_results(result)
    assert result.action == "continue"


def test_ptr_answer_with_50_names_bounds_iprev_and_spf_ptr(running: Running) -> None:
    result, lookups = running.send(PLAIN, client_ip=PTR_CLIENT, mail_from="alice@ptr50.example")
    relevant = [(name, rdtype) for name, rdtype in lookups
                if name == PTR_REVERSE or name.endswith("ptr50.example")]
    iprev_names, spf_names = running.limits.iprev_names, running.limits.spf_ptr_names
    # iprev at connect: the PTR and one address lookup per name it keeps; then SPF: the
    # record, the PTR again (the cache is off) and one address lookup per name it keeps
    assert [rdtype for _, rdtype in relevant] == (
        ["PTR"] + ["A"] * iprev_names + ["TXT", "PTR"] + ["A"] * spf_names)
    looked_up = [name for name, rdtype in relevant if rdtype == "A"]
    assert set(looked_up) <= set(PTR_NAMES)
    assert len(set(looked_up[:iprev_names])) == iprev_names
    assert len(set(looked_up[iprev_names:])) == spf_names
    results = our_results(result)
    assert f"iprev=fail ({looked_up[0]}) policy.iprev={PTR_CLIENT}" in results
    assert "spf=neutral smtp.mailfrom=alice@ptr50.example" in results  # names past 10: ignored


# == DKIM and ARC ================================================================================
def signed_100_times() -> bytes:
    signed = PLAIN
    for i in range(100):
        field = dkimpy.sign(signed, f"s{i}".encode(), f"d{i}.sig.example".encode(), PEM,
                            include_headers=[b"from", b"to", b"subject", b"date"])
        signed = bytes(field) + signed
    return signed


def test_100_signatures_cost_at_most_the_limit_of_key_lookups(running: Running) -> None:
    result, lookups = running.send(signed_100_times())
    limit = running.limits.dkim_signatures
    # the top signatures are the last made: s99, s98, ...
    assert under(lookups, "sig.example") == [
        (f"s{i}._domainkey.d{i}.sig.example", "TXT") for i in range(99, 99 - limit, -1)]
    results = our_results(result)
    assert results.count("dkim=pass") == limit
    assert results.count("dkim=neutral") == 1
    assert f"{100 - limit} not evaluated: more than {limit} signatures" in results
    assert result.action == "continue"


def arc_chain(sets: int) -> bytes:
    """A message sealed by sealer1..sealerN.arc.example, each validating the chain before."""
    sealed = PLAIN
    for i in range(1, sets + 1):
        sealer = f"sealer{i}.arc.example"
        results = f"{sealer}; spf=pass smtp.mailfrom={AUTHOR}"
        if i > 1:
            results += "; arc=pass"
        sealed = f"Authentication-Results: {results}\r\n".encode() + sealed
        fields = dkimpy.arc_sign(sealed, b"arc", sealer.encode(), PEM, sealer.encode())
        sealed = b"".join(fields) + sealed
    return sealed


def test_an_arc_chain_longer_than_the_limit_costs_no_lookup(running: Running) -> None:
    result, lookups = running.send(arc_chain(3))
    keys = under(lookups, "arc.example")
    if running.limits.arc_sets < 3:
        assert keys == []
        assert "arc=fail" in our_results(result)
    else:  # each set: the key of its message signature, then of its seal, newest first
        assert keys == [(f"arc._domainkey.sealer{i}.arc.example", "TXT")
                        for i in (3, 3, 2, 2, 1, 1)]
        assert "arc=pass" in our_results(result)
    assert result.action == "continue"


# == the header ==================================================================================
def timed(running: Running, data: bytes) -> tuple[MilterResult, list[tuple[str, str]], float,
                                                  int]:
    before = running.worker_rss()
    started = time.perf_counter()
    result, lookups = running.send(data)
    elapsed = time.perf_counter() - started
    return result, lookups, elapsed, running.worker_rss() - before


BAD_SIGNATURE = ("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=hdr.example; "
                 "s=sel; h=from:subject; bh=AAAA; b=AAAA")


def test_10000_header_fields(running: Running) -> None:
    fillers = [f"X-Filler-{i}: value {i}" for i in range(10_000)]
    # a signature as field 500: seen with 1,000 fields kept, not with 200
    fields = [*fillers[:499], BAD_SIGNATURE, *fillers[499:]]
    result, lookups, elapsed, growth = timed(running, message(*fields))
    kept = running.limits.header_fields >= 500
    assert under(lookups, "hdr.example") == ([("sel._domainkey.hdr.example", "TXT")]
                                             if kept else [])
    results = our_results(result)
    assert ("dkim=permerror" if kept else "dkim=none") in results
    # the From field, past the limit, is still seen: DMARC finds the author domain
    assert "dmarc=none" in results and "header.from=author.example" in results
    assert result.action == "continue"
    assert elapsed < 5, elapsed
    assert growth < 64 * 1024 * 1024, growth
    log = running.daemon.wait_for_log("headers=over_limit")
    assert f"{10_005 - running.limits.header_fields} of 10006 header fields left out" in log


def over_64k(running: Running) -> bool:
    """libmilter takes no packet over 64 KiB (MILTER_CHUNK_SIZE, unless the MTA negotiates
    SMFIP_MDS_*), and Postfix sends none: of a 72 KB field it keeps about 60 KB
    (test_postfix_e2e). A peer that sends one is cut off there; the field never reaches us."""
    return running.daemon.config["transport"] == "libmilter"


def test_a_packet_over_64_kib_is_refused_by_libmilter_and_the_daemon_goes_on(
        running: Running) -> None:
    if not over_64k(running):
        pytest.skip("the native transport takes up to 1 MiB (test_a_1_mb_header_field)")
    with pytest.raises(MilterProtocolError):
        running.send(message("X-Huge: " + "b" * 70_000))
    result, _ = running.send(PLAIN)
    assert result.action == "continue"


def test_1000_character_lines(running: Running) -> None:
    if over_64k(running):
        pytest.skip("one field of 100 KB: over libmilter's 64 KiB packets (see above)")
    _, plain = running.send(PLAIN)
    long_fields = [f"X-Long-{i}: " + "a" * (1000 - len(f"X-Long-{i}: ")) for i in range(1000)]
    folded = "X-Folded: start" + "".join("\r\n\t" + "f" * 998 for i in range(100))
    result, lookups, elapsed, growth = timed(running, message(folded, *long_fields))
    assert result.action == "continue"
    assert "dmarc=none" in our_results(result)
    assert elapsed < 5, elapsed
    assert growth < 64 * 1024 * 1024, growth
    assert lookups == plain  # not one lookup more than for a small message


def test_a_1_mb_header_field(running: Running) -> None:
    if over_64k(running):
        pytest.skip("over libmilter's 64 KiB packets (test_a_packet_over_64_kib_...)")
    huge = "X-Huge: " + "b" * 1_000_000
    forged = f"Authentication-Results: {AUTHSERV}; dkim=pass (" + "c" * 1_000_000 + ")"
    # its authserv-id behind half a million comments: reading them all takes about 1 s
    hidden = "Authentication-Results: " + "()" * 500_000 + f" {AUTHSERV}; dkim=pass"
    _, plain = running.send(PLAIN)
    result, lookups, elapsed, growth = timed(running, message(huge, forged, hidden))
    assert lookups == plain
    assert result.action == "continue"
    # both forged fields are deleted, the last first
    deleted = [m for m in result.modifications if m[0] == "m"]
    assert deleted == [("m", 2, "Authentication-Results", ""),
                       ("m", 1, "Authentication-Results", "")]
    assert "dmarc=none" in our_results(result)
    assert elapsed < 5, elapsed
    assert growth < 64 * 1024 * 1024, growth
