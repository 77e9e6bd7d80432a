"""A DNS server that misbehaves on purpose, behind a real Postfix with the real daemon (both
transports): every way of misbehaving (hostile_dns.py) gets 451 4.7.24 at MAIL FROM within the
stage budget plus a margin, never a 5xx; the resolver closes every TCP connection it opened to
the server by the time the reply is given, and the workers hold no more threads afterwards
than after a healthy transaction (none is left waiting on the DNS)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from hostile_dns import MODES, HostileDNS
from postfix import PostfixInstance

pytestmark = [
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="Postfix is not installed (scripts/setup.sh --test)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Postfix needs root"),
]

STAGE_BUDGET = 2.0
MARGIN = 1.0  # Postfix's own work, and a loaded machine


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostfixInstance, str]]:
    workdir = tmp_path_factory.mktemp("hostile-dns")
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-hostile-dns-"))
    sockets.chmod(0o755)  # Postfix's smtpd (user postfix) connects to the socket in here
    instance = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        instance.start()
        yield instance, f"{sockets}/milter.sock"
    finally:
        instance.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def daemon(workdir: Path, socket: str, transport: str, port: int) -> Daemon:
    return Daemon(workdir, {
        "transport": transport, "listen": f"unix:{socket}", "socket_mode": "0666",
        "authserv_id": "mx.test.example", "workers": 1, "drain_timeout": 5,
        "stage_budget": STAGE_BUDGET,
        # the resolver alone would wait far longer: the stage budget must be what ends it
        "dns": {"nameservers": [f"127.0.0.1:{port}"], "timeout": 5, "lifetime": 30},
        "rules": {"mail": [{"name": "spf", "check": "spf", "header": "auth"}]},
    })


def mail_from(port: int, sender: str) -> tuple[int, str, float]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("[127.0.0.1]")
        started = time.monotonic()
        code, text = smtp.mail(sender)
        return code, text.decode(errors="replace"), time.monotonic() - started


def threads(daemon: Daemon) -> int:
    """Threads of the daemon's processes (the master and its worker)."""
    assert daemon.process is not None
    master, total = daemon.process.pid, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if int(entry.name) == master or int(stat.rpartition(")")[2].split()[1]) == master:
            found = re.search(r"^Threads:\s+(\d+)", status, re.M)
            total += int(found.group(1)) if found else 0
    return total


@pytest.mark.parametrize("transport", ["libmilter", "native"])
def test_a_hostile_dns_server_gets_451_within_the_stage_budget(
        postfix: tuple[PostfixInstance, str], tmp_path: Path,
        transport: str) -> None:
    mx, socket = postfix
    measured: dict[str, float] = {}
    for mode in MODES:
        with HostileDNS(mode, pace=0.5) as hostile:
            milter = daemon(tmp_path / f"{transport}-{mode}", socket, transport, hostile.port)
            milter.start()
            try:
                # first a transaction that needs no DNS (the null sender with an address
                # literal as HELO: SPF none), to warm the thread pools
                code, _, _ = mail_from(mx.smtp_port, "")
                assert code == 250
                baseline = threads(milter)
                code, text, took = mail_from(mx.smtp_port, "x@spoiled.test")
                assert code == 451 and text.startswith("4.7.24 "), (mode, code, text)
                assert took <= STAGE_BUDGET + MARGIN, (mode, took)
                measured[mode] = round(took, 3)
                # a dripping peer notices the close when it sends its next byte
                deadline = time.monotonic() + 3
                while hostile.open_tcp and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert hostile.open_tcp == 0, (mode, "a TCP connection to the DNS left open")
                assert threads(milter) <= baseline, (mode, threads(milter), baseline)
            finally:
                milter.stop()
    print(f"\nhostile DNS, MAIL FROM reply times through Postfix [{transport}]: {measured}")
    refused = [line for line in mx.maillog().splitlines() if re.search(r"\b5\d\d 5\.", line)]
    assert not refused, refused
