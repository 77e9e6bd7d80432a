"""The `dmarc_reports` rule behind a real Postfix: the corpus of test_dmarc_ingest mailed to our
rua= address. Good reports are stored once (a duplicate mail too, but once), every message is
still delivered (keep: true), a message with a broken report is delivered and not stored,
`keep: false` discards a stored report mail but never one that has other recipients too, and
the log line says why a report was not stored."""

from __future__ import annotations

import gzip
import os
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from postfix import PostfixInstance, postfix_available
from test_dmarc_ingest import LAUGHS, RFC7489, mail, zipped

from mailwarden.dmarc.received_store import received_count
from mailwarden.dmarc.store import Store

pytestmark = [
    pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Postfix needs root"),
]

RUA = "dmarc@ours.example"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[PostfixInstance, Daemon, Path]]:
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-rua-"))
    sockets.chmod(0o755)
    store = tmp_path / "store.db"
    milter = Daemon(tmp_path / "milter", {
        "listen": f"unix:{sockets}/milter.sock", "socket_mode": "0666",
        "authserv_id": "mx.ours.example", "workers": 1, "drain_timeout": 5,
        "dmarc": {"store": str(store)},
        "rules": {"eom": [{"name": "reports", "check": "dmarc_reports", "addresses": [RUA],
                           "keep": False}]},
    })
    milter.start()
    mx = PostfixInstance(tmp_path / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        mx.start()
        yield mx, milter, store
    finally:
        mx.stop()
        milter.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def send(mx: PostfixInstance, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", mx.smtp_port, timeout=60) as smtp:
        smtp.ehlo("mx.acme.example")
        smtp.sendmail("noreply-dmarc-support@acme.example", rcpts, data)


def test_reports_arriving_by_mail(stack: tuple[PostfixInstance, Daemon, Path]) -> None:
    mx, milter, store = stack
    good = mail(gzip.compress(RFC7489), "acme!example.com!1!2.xml.gz", "gzip")
    send(mx, [RUA], good)  # stored, then discarded (keep: false)
    send(mx, [RUA], mail(zipped("r.xml", RFC7489), "r.zip", "zip"))  # duplicate: discarded
    other = RFC7489.replace(b"9391651994964116463", b"555")
    send(mx, [RUA, "postmaster@ours.example"], mail(other, "x.xml", "xml"))  # kept: 2 rcpts
    send(mx, [RUA], mail(LAUGHS, "evil.xml", "xml"))  # refused, delivered
    send(mx, [RUA], mail(gzip.compress(RFC7489)[:50], "cut.xml.gz", "gzip"))  # same
    deadline = time.monotonic() + 30
    while len(mx.deliveries()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # a discarded message would not arrive anyway: give the others time
    delivered = mx.deliveries()
    assert sorted(d.rcpt_tos for d in delivered) == [
        (RUA,), (RUA,), (RUA, "postmaster@ours.example")], delivered
    opened = Store.open(str(store))
    assert received_count(opened) == (2, 2)  # acme's report and the "555" one
    opened.close()
    log = milter.log()
    assert log.count("results=dmarc_reports=fail") == 2, log
    assert "DTD or entities" in log and "broken gzip data" in log


def test_the_whole_corpus_through_postfix(stack: tuple[PostfixInstance, Daemon, Path],
                                          tmp_path: Path) -> None:
    """The corpus `dmarc ingest` gets, mailed instead: the same reports are stored, the same
    broken ones refused, and every message that is not a stored report still arrives."""
    from test_dmarc_ingest import corpus
    from test_dmarc_reports import DAY, SETTINGS, fill

    from mailwarden.dmarc.report import build_reports

    mx, milter, store = stack
    ours_store = Store.open(str(tmp_path / "ours.db"))
    fill(ours_store)
    ours = [r.xml for r in build_reports(ours_store, period_start=DAY, period_end=DAY + 86400,
                                         settings=SETTINGS)]
    ours_store.close()
    files = tmp_path / "corpus"
    files.mkdir()
    refused = 0
    for name, data in corpus(files, ours).items():
        message = data if name.endswith(".eml") else mail(data, name, "octet-stream")
        send(mx, [RUA], message)
        refused += name.startswith("broken-")
    milter.wait_for_log("dmarc_reports=", count=10)
    deadline = time.monotonic() + 30
    while len(mx.deliveries()) < refused and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    # stored (and, keep: false, discarded): ours x2, acme, acme's mail; the duplicate too
    assert len(mx.deliveries()) == refused, milter.log()
    opened = Store.open(str(store))
    assert received_count(opened)[0] == 4
    opened.close()
    log = milter.log()
    for reason in ("broken gzip data", "more than", "DTD or entities", "urn:example:other",
                   "no report in the message"):
        assert reason in log, reason
