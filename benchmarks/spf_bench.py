"""SPF evaluations per second: mailwarden against pyspf, in one run, through real DNS.

A loopback DNS server (mailwarden.devtools.devdns, in its own process so it does not share the
GIL with the evaluators) serves a realistic mix of records: provider include chains three and
four deep with long ip4/ip6 lists, mx and a mechanisms, and plain ip4 lists. Both
implementations evaluate
the same transactions through the same server:

  cold  every evaluation starts with an empty cache (a new resolver / default resolver cache off)
  warm  one long-lived cache, filled by a first pass (mailwarden's shared resolver; for pyspf,
        dnspython's LRUCache on the default resolver, which pyspf uses)

Run:  .venv/bin/python benchmarks/spf_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.resolver
import spf as pyspf
import yaml

from mailwarden.dns import Nameserver, Resolver
from mailwarden.spf import check_mailfrom

Case = tuple[str, str, str]  # ip, sender, helo


def _netblocks(prefix: str, count: int, v6: bool = False) -> str:
    terms = [f"ip4:{prefix}.{i * 8}.0/21" for i in range(count)]
    if v6:
        terms += [f"ip6:2001:db8:{i:x}::/48" for i in range(count // 2)]
    return " ".join(terms)


def build_zone() -> tuple[dict[str, Any], list[Case]]:
    """Sender domains with records shaped like those of large mail providers and small sites."""
    zone: dict[str, Any] = {
        # "provider A": a Google-like chain, 3 deep: domain -> _spf -> 3 netblock records
        "_spf.prova.example": [{"TXT": "v=spf1 include:_nb1.prova.example "
                                "include:_nb2.prova.example include:_nb3.prova.example ~all"}],
        "_nb1.prova.example": [{"TXT": "v=spf1 " + _netblocks("10.1", 12, v6=True) + " ~all"}],
        "_nb2.prova.example": [{"TXT": "v=spf1 " + _netblocks("10.2", 12) + " ~all"}],
        "_nb3.prova.example": [{"TXT": "v=spf1 " + _netblocks("10.3", 12) + " ~all"}],
        # "provider B": a Microsoft-like chain, 4 deep
        "spf.protection.provb.example": [{"TXT": "v=spf1 include:spfa.provb.example "
                                          "include:spfb.provb.example -all"}],
        "spfa.provb.example": [{"TXT": "v=spf1 include:spfa1.provb.example -all"}],
        "spfa1.provb.example": [{"TXT": "v=spf1 " + _netblocks("10.4", 16) + " -all"}],
        "spfb.provb.example": [{"TXT": "v=spf1 " + _netblocks("10.5", 16) + " -all"}],
        # "provider C": one flat list
        "_spf.provc.example": [{"TXT": "v=spf1 " + _netblocks("10.6", 20) + " -all"}],
    }
    cases: list[Case] = []
    for i in range(40):
        domain = f"d{i}.example"
        kind = i % 4
        mx_host, web = f"mx.{domain}", f"www.{domain}"
        zone[mx_host] = [{"A": f"192.0.{i}.25"}, {"AAAA": f"2001:db8:ff:{i:x}::25"}]
        zone[web] = [{"A": f"192.0.{i}.80"}]
        entries: list[Any] = [{"MX": [10, mx_host]}, {"A": f"192.0.{i}.80"}]
        if kind == 0:
            entries.append({"TXT": "v=spf1 include:_spf.prova.example ~all"})
            cases += [(f"10.3.{(i % 12) * 8}.9", f"u{i}@{domain}", "mail.prova.example"),
                      (f"2001:db8:{i % 6:x}::1", f"u{i}@{domain}", "mail.prova.example")]
        elif kind == 1:
            entries.append({"TXT": "v=spf1 mx include:spf.protection.provb.example -all"})
            cases += [(f"10.5.{(i % 16) * 8}.7", f"u{i}@{domain}", "out.provb.example"),
                      (f"192.0.{i}.25", f"u{i}@{domain}", mx_host)]
        elif kind == 2:
            entries.append({"TXT": f"v=spf1 mx a ip4:198.51.{i}.0/24 ip4:203.0.{i}.0/24 "
                                   "include:_spf.provc.example include:_spf.prova.example -all"})
            cases += [(f"10.1.{(i % 12) * 8}.3", f"u{i}@{domain}", "mail.prova.example"),
                      (f"198.51.{i}.77", f"u{i}@{domain}", f"host.{domain}")]
        else:
            entries.append({"TXT": "v=spf1 a mx ip4:198.18.0.0/15 -all"})
            cases += [(f"192.0.{i}.80", f"u{i}@{domain}", web)]
        # and one forged sender for every domain: evaluates the whole record to the end
        cases.append((f"100.64.{i}.1", f"forged@{domain}", "spammer.invalid"))
        if i % 2 == 0:
            # Site-verification records, as at the apex of most real domains; they take the
            # TXT answer past 512 octets, so a resolver without EDNS must retry over TCP.
            entries += [{"TXT": f"{service}-verification={i:04d}{'x' * 48}"}
                        for service in ("google-site", "ms", "apple-domain", "facebook-domain",
                                        "atlassian-domain", "docusign", "zoom", "stripe")]
        zone[domain] = entries
    return zone, cases


def start_dns(zone: dict[str, Any]) -> tuple[subprocess.Popen[str], int, Path]:
    handle, name = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(handle, "w") as out:
        yaml.safe_dump(zone, out)
    process = subprocess.Popen(
        [sys.executable, "-m", "mailwarden.devtools.devdns", name, "--host", "127.0.0.1",
         "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"devdns did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1]), Path(name)


Runner = tuple[Callable[[Case], object], Callable[[], None] | None]


def rates(runners: list[Runner], cases: list[Case], seconds: float, rounds: int = 6) -> list[float]:
    """Evaluations per second of each runner, cycling through `cases` for about `seconds` each,
    in interleaved rounds so that drift in the machine's speed hits every runner alike."""
    done = [0] * len(runners)
    spent = [0.0] * len(runners)
    for _ in range(rounds):
        for index, (evaluate, before_each) in enumerate(runners):
            started = time.perf_counter()
            deadline = started + seconds / rounds
            while time.perf_counter() < deadline:
                for case in cases:
                    if before_each is not None:
                        before_each()
                    evaluate(case)
                    done[index] += 1
            spent[index] += time.perf_counter() - started
    return [count / elapsed for count, elapsed in zip(done, spent, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)

    zone, cases = build_zone()
    process, port, path = start_dns(zone)
    try:
        server = Nameserver("127.0.0.1", port)
        ours = Resolver(nameservers=[server], timeout=2.0)
        theirs = dns.resolver.Resolver(configure=False)
        theirs.nameservers = ["127.0.0.1"]
        theirs.port = port
        dns.resolver.default_resolver = theirs

        def mailwarden_eval(case: Case) -> str:
            return str(check_mailfrom(ours, case[0], case[1], case[2]).result)

        def pyspf_eval(case: Case) -> str:
            result: str = pyspf.check2(i=case[0], s=case[1], h=case[2])[0]
            return result

        disagreements = [c for c in cases if mailwarden_eval(c) != pyspf_eval(c)]
        results: dict[str, int] = {}
        for case in cases:
            outcome = mailwarden_eval(case)
            results[outcome] = results.get(outcome, 0) + 1

        def cold_ours() -> None:
            ours.clear_cache()

        def cold_theirs() -> None:
            theirs.cache = None

        cold_m, cold_p = rates([(mailwarden_eval, cold_ours), (pyspf_eval, cold_theirs)],
                               cases, args.seconds)

        theirs.cache = dns.resolver.LRUCache(100_000)
        for case in cases:
            mailwarden_eval(case)
            pyspf_eval(case)
        warm_m, warm_p = rates([(mailwarden_eval, None), (pyspf_eval, None)], cases,
                               args.seconds)
    finally:
        process.terminate()
        process.wait(timeout=10)
        path.unlink()

    ipv6 = sum(1 for c in cases if ipaddress.ip_address(c[0]).version == 6)
    print(f"SPF benchmark: {len(cases)} transactions ({ipv6} over IPv6), {len(zone)} DNS names; "
          f"results {dict(sorted(results.items()))}; pyspf disagrees on {len(disagreements)}")
    for case in disagreements[:5]:
        print(f"  disagreement: {case}")
    print(f"{'cache':<6} {'mailwarden/s':>13} {'pyspf/s':>10} {'ratio':>7}  target")
    print(f"{'cold':<6} {cold_m:>13,.0f} {cold_p:>10,.0f} {cold_m / cold_p:>6.2f}x  >= 1x")
    print(f"{'warm':<6} {warm_m:>13,.0f} {warm_p:>10,.0f} {warm_m / warm_p:>6.2f}x  >= 3x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
