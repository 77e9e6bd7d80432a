"""`dmarc.mode: legacy` is RFC 7489 through a real Postfix: pct= sampling (§6.6.4) under
p=reject and p=quarantine at 0, 50 and 100 percent. A failing message inside the sample gets
the policy; outside it, the next less strict one (reject -> quarantine -> none). The draws are
fixed by MAILWARDEN_PCT_SEED so that the test knows which message falls where; the reports
name the sampled-out ones."""

from __future__ import annotations

import random
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon
from postfix import PostfixInstance

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.logparse import decisions

pytestmark = pytest.mark.skipif(shutil.which("postfix") is None and
                                not Path("/usr/sbin/postfix").exists(),
                                reason="Postfix is not installed (scripts/setup.sh --test)")

SEED = "issue-17"
POLICIES = {f"{policy[0]}{pct}.example": (policy, pct)
            for policy in ("reject", "quarantine") for pct in (0, 50, 100)}
ZONE: dict[str, list[object]] = {"bounce.example": [{"TXT": "v=spf1 -all"}]}
for _domain, (_policy, _pct) in POLICIES.items():
    ZONE[_domain] = [{"A": "192.0.2.1"}]
    ZONE[f"_dmarc.{_domain}"] = [{"TXT": f"v=DMARC1; p={_policy}; pct={_pct}"}]
LESS_STRICT = {"reject": "quarantine", "quarantine": "none"}
VERDICT = {"reject": "reject", "quarantine": "quarantine", "none": "continue"}


@dataclass
class Stack:
    daemon: Daemon
    postfix: PostfixInstance
    workdir: Path


@pytest.fixture(scope="module")
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dmarc-legacy")
    dns_server.load(ZONE)
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-legacy-"))
    sockets.chmod(0o755)
    config = {
        # one worker: the seeded draws are one sequence, taken in the order mail arrives
        "listen": f"unix:{sockets}/milter.sock", "socket_mode": "0666",
        "authserv_id": "mx.test.example", "workers": 1, "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "dmarc": {"mode": "legacy", "store": str(workdir / "dmarc.db")},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "on": {"fail": "continue"}}],
            "eom": [{"name": "dmarc", "check": "dmarc"}],
        },
    }
    daemon = Daemon(workdir / "milter", config, env={"MAILWARDEN_PCT_SEED": SEED})
    daemon.start()
    postfix = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        postfix.start()
        yield Stack(daemon, postfix, workdir)
    finally:
        postfix.stop()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def send(stack: Stack, domain: str, msgid: str) -> None:
    data = (f"From: <a@{domain}>\r\nTo: <bob@ours.example>\r\nSubject: {msgid}\r\n"
            f"Message-ID: <{msgid}@test>\r\n\r\nbody\r\n").encode()
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.bounce.example")
        try:
            smtp.sendmail("x@bounce.example", ["bob@ours.example"], data)
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550, exc


def verdicts(stack: Stack, count: int) -> dict[str, str]:
    """msgid -> the end-of-message verdict, from the daemon's decision lines."""
    stack.daemon.wait_for_log("stage=eom", timeout=60, count=count)
    return {line["msgid"].strip("<>").removesuffix("@test"): line["verdict"]
            for line in decisions(iter(stack.daemon.log().splitlines()))
            if line.get("stage") == "eom" and "msgid" in line}


# the messages in the order they are sent: 40 to each pct=50 domain, 3 to each other one
PLAN = [(domain, f"{domain.split('.')[0]}-{n}")
        for domain, (_, pct) in POLICIES.items() for n in range(40 if pct == 50 else 3)]


@pytest.fixture(scope="module")
def seen(stack: Stack) -> dict[str, str]:
    for domain, msgid in PLAN:
        send(stack, domain, msgid)
    return verdicts(stack, len(PLAN))


def test_pct_sampling_through_postfix(stack: Stack, seen: dict[str, str]) -> None:
    draws = random.Random(SEED)
    expected, sampled_in = {}, {domain: 0 for domain in POLICIES}
    for domain, msgid in PLAN:
        policy, pct = POLICIES[domain]
        # §6.6.4: a draw per failing message whose policy samples (pct < 100)
        inside = pct == 100 or draws.random() * 100 < pct
        sampled_in[domain] += inside
        expected[msgid] = VERDICT[policy if inside else LESS_STRICT[policy]]
    assert {msgid: seen.get(msgid) for _, msgid in PLAN} == expected
    # the shape RFC 7489 promises, independently of the seed's sequence
    assert sampled_in["r0.example"] == sampled_in["q0.example"] == 0
    assert sampled_in["r100.example"] == sampled_in["q100.example"] == 3
    assert 10 <= sampled_in["r50.example"] <= 30 and 10 <= sampled_in["q50.example"] <= 30
    rejected = [line for line in stack.postfix.maillog().splitlines() if "milter-reject" in line]
    assert len(rejected) == list(expected.values()).count("reject"), rejected
    assert all(" 5.7.1 " in line for line in rejected), rejected


def test_sampled_out_messages_are_named_in_the_reports(stack: Stack,
                                                        seen: dict[str, str]) -> None:
    from mailwarden.dmarc.store import Store

    store = Store.open(str(stack.workdir / "dmarc.db"))
    try:
        deadline = time.monotonic() + 30
        while store.count() < len(PLAN) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = store.evaluations()
    finally:
        store.close()
    by_domain: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for row in rows:
        by_domain.setdefault(row.header_from, []).append((row.disposition, row.overrides))

    def sampled(pct: int) -> tuple[tuple[str, str], ...]:
        return (("other", f"sampled_out: pct={pct} (RFC 7489 section 6.6.4)"),)

    assert by_domain["r0.example"] == [("quarantine", sampled(0))] * 3
    assert by_domain["q0.example"] == [("none", sampled(0))] * 3
    assert by_domain["r100.example"] == [("reject", ())] * 3
    fifty = by_domain["r50.example"]
    assert sorted({d for d, _ in fifty}) == ["quarantine", "reject"]
    assert all(reasons == (sampled(50) if d == "quarantine" else ()) for d, reasons in fifty)
