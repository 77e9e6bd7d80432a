"""A DNS server that misbehaves on purpose (hostile_dns.py) costs at most the deadline: the answer
dripped a byte at a time over TCP, a TCP connection that is never completed, one that is never
answered, an answer with the wrong id, an answer over the EDNS size we advertised. Each ends as
temperror within the budget plus 10%, in the resolver, in the SPF evaluation and in the
`mailwarden spf` command (whose own start-up is measured beside it and taken off)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from hostile_dns import MODES, HostileDNS

from mailwarden.config.build import parse
from mailwarden.daemon import build_runtime
from mailwarden.deadline import Deadline
from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dns import Nameserver, Resolver, Status
from mailwarden.spf import Limits, check_mailfrom
from mailwarden.stage import Connection
from mailwarden.verdict import Action

SLACK = 1.10  # the budget plus 10%


@pytest.fixture(params=MODES)
def hostile(request: pytest.FixtureRequest) -> Iterator[HostileDNS]:
    with HostileDNS(request.param, pace=0.5) as server:
        yield server


def resolver(server: HostileDNS, timeout: float = 1.0, lifetime: float = 30.0) -> Resolver:
    return Resolver(nameservers=[Nameserver(server.host, server.port)], timeout=timeout,
                    lifetime=lifetime)


def test_a_lookup_ends_by_its_deadline(hostile: HostileDNS) -> None:
    budget = 2.0
    started = time.monotonic()
    answer = resolver(hostile, timeout=1.5).txt("spoiled.example", Deadline.within(budget))
    elapsed = time.monotonic() - started
    assert answer.status is Status.TEMPERROR, answer
    assert elapsed <= budget * SLACK, f"{hostile.mode}: {elapsed:.2f} s"
    assert hostile.queries >= 1


def test_a_lookup_without_a_deadline_ends_by_the_resolvers_lifetime(hostile: HostileDNS) -> None:
    # timeout 1.5 per exchange: the drip (>40 octets at 0.5 s) and a silent TCP peer would each
    # hold one exchange far longer if the timeout applied per read rather than per exchange
    started = time.monotonic()
    answer = resolver(hostile, timeout=1.5, lifetime=2.5).txt("spoiled.example")
    elapsed = time.monotonic() - started
    assert answer.status is Status.TEMPERROR, answer
    assert elapsed <= 2.5 * SLACK, f"{hostile.mode}: {elapsed:.2f} s"


def test_the_spf_evaluation_ends_within_its_budget(hostile: HostileDNS) -> None:
    budget = 2.0
    started = time.monotonic()
    result = check_mailfrom(resolver(hostile, timeout=1.5), "192.0.2.1", "a@spoiled.example",
                            "spoiled.example", limits=Limits(budget=budget))
    elapsed = time.monotonic() - started
    assert str(result.result) == "temperror", result
    assert elapsed <= budget * SLACK, f"{hostile.mode}: {elapsed:.2f} s"


def test_a_stage_deadline_earlier_than_the_spf_budget_wins(hostile: HostileDNS) -> None:
    started = time.monotonic()
    result = check_mailfrom(resolver(hostile, timeout=1.5), "192.0.2.1", "a@spoiled.example",
                            "spoiled.example", limits=Limits(budget=20.0),
                            deadline=Deadline.within(1.0))
    elapsed = time.monotonic() - started
    assert str(result.result) == "temperror", result
    assert elapsed <= 1.0 * SLACK, f"{hostile.mode}: {elapsed:.2f} s"


def _spf_command(nameserver: str, budget: float) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mailwarden", "spf", "--ip", "192.0.2.1",
         "--sender", "a@spoiled.example", "--helo", "spoiled.example",
         "--nameserver", nameserver, "--timeout", "1.5", "--budget", str(budget), "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data, elapsed


def test_the_spf_command_ends_within_its_budget(hostile: HostileDNS,
                                                dns_server: DevDNSServer) -> None:
    dns_server.load({"spoiled.example": [{"TXT": "v=spf1 -all"}]})
    healthy, startup = _spf_command(f"{dns_server.host}:{dns_server.port}", 3.0)
    assert healthy["result"] == "fail"
    data, elapsed = _spf_command(f"{hostile.host}:{hostile.port}", 3.0)
    assert data["result"] == "temperror", data
    assert elapsed - startup <= 3.0 * SLACK, f"{hostile.mode}: {elapsed:.2f} s, " \
                                             f"start-up {startup:.2f} s"


@pytest.mark.parametrize(("rule", "status"), [
    ("{name: spf, check: spf}", "4.7.24"),  # SPF's own budget is 20 s
    ("{name: spf, check: spf, when: {not: {client_in: relays}}}", "4.4.3"),  # host group
])
def test_the_stage_budget_bounds_every_check_of_a_stage(rule: str, status: str) -> None:
    """`stage_budget` ends what waits on the DNS at a stage -- the SPF evaluation, a host
    group's lookup -- whatever their own limits: MAIL FROM is answered 451 within the budget
    plus 10%."""
    with HostileDNS("tcp-silent") as server:
        config = parse(textwrap.dedent(f"""\
            authserv_id: mx.example.net
            stage_budget: 1.5
            dns: {{nameservers: ["{server.host}:{server.port}"], timeout: 5, lifetime: 30}}
            hosts: {{relays: [relay.spoiled.example]}}
            rules:
              mail:
                - {rule}
            """))
        connection = Connection(build_runtime(config))
        try:
            connection.connect("client.example.org", "192.0.2.1")
            connection.helo("client.example.org")
            started = time.monotonic()
            decision = connection.mail("<a@spoiled.example>")
            elapsed = time.monotonic() - started
        finally:
            connection.close()
    assert decision.action is Action.TEMPFAIL, decision
    assert decision.reply is not None
    assert (decision.reply.code, decision.reply.status) == (451, status), decision.reply
    assert elapsed <= 1.5 * SLACK, f"{elapsed:.2f} s"
