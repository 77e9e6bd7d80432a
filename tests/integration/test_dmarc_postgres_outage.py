"""A PostgreSQL report store that is down when the daemon starts (issue 14): the daemon starts
anyway and says why, `check-config` says the same and exits 0, mail is judged as usual while
nothing can be recorded, and once the server is back the evaluations are recorded again (the
recovery logged with the count of those that were not). A wrong database name, by contrast,
is a configuration to fix: `check-config` exits 1. The real server of test_dmarc_postgres."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from daemon import Daemon
from milterload import MilterClient
from test_dmarc_postgres import Server, pg  # noqa: F401  (the module's server fixture)

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dmarc.recorder import RETRY_OPEN

AUTHSERV = "mx.outage.example"


def eml(subject: str) -> bytes:
    return (f"From: <alice@sender.example>\r\nTo: <bob@ours.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@outage.example>\r\n\r\nbody\r\n").encode()


def config(url: str, dns_port: int, socket: Path) -> dict[str, Any]:
    return {
        "listen": f"unix:{socket}", "authserv_id": AUTHSERV, "workers": 1,
        "log_level": "info", "user": "root",
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 0.5, "lifetime": 1.0},
        "dmarc": {"store": url},
        "rules": {"mail": [{"name": "spf", "check": "spf", "header": "auth"}],
                  "eom": [{"name": "dmarc", "check": "dmarc"}]},
    }


def send(daemon: Daemon, subject: str) -> str:
    """One message through the daemon; its Authentication-Results value."""
    started = time.monotonic()
    with MilterClient(daemon.socket, timeout=30) as client:
        result = client.send_message(client_ip="192.0.2.10", helo="out.sender.example",
                                     mail_from="alice@sender.example",
                                     rcpts=["bob@ours.example"], message=eml(subject))
    assert (result.stage, result.action) == ("eom", "continue"), result
    assert time.monotonic() - started < 5, "the message waited on the store"
    return dict(result.headers_added)["Authentication-Results"]


def rows(url: str) -> int:
    psycopg: Any = importlib.import_module("psycopg")
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT count(*) FROM evaluations").fetchone()[0])


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", "check-config", str(path),
                           "--json"], capture_output=True, text=True, timeout=60, check=False)


def test_a_store_down_at_start_costs_report_rows_not_the_start_or_mail(
        pg: Server, dns_server: DevDNSServer, tmp_path: Path) -> None:  # noqa: F811
    dns_server.load({
        "sender.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        "_dmarc.sender.example": [{"TXT": "v=DMARC1; p=reject"}],
    })
    url = pg.new_database()
    settings = config(url, dns_server.port, tmp_path / "milter.sock")
    path = tmp_path / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(settings))
    pg.stop()
    try:
        checked = check_config(path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        result = json.loads(checked.stdout)
        assert result["problems"] == [], result["problems"]
        assert "cannot be reached" in result["store"], result["store"]
        daemon = Daemon(tmp_path / "daemon", settings)
        daemon.start()  # it starts: the store being down is no reason to refuse mail
        try:
            said = r"DMARC store .* cannot be opened now \(the server cannot be reached"
            deadline = time.monotonic() + 10
            while not re.search(said, daemon.log()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert re.search(said, daemon.log()), daemon.log()
            for n in range(3):
                assert "dmarc=pass" in send(daemon, f"while down {n}")
        except BaseException:
            daemon.stop()
            raise
    finally:
        pg.start()
    try:
        # the next attempt to open comes RETRY_OPEN s after the last failed one
        time.sleep(RETRY_OPEN + 0.5)
        for n in range(4):
            assert "dmarc=pass" in send(daemon, f"once back {n}")
        deadline = time.monotonic() + 10
        while rows(url) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rows(url) == 4  # the three of the outage were not recorded, and said so
        assert re.search(r"is recording again; 3 evaluation\(s\) were not recorded",
                         daemon.log()), daemon.log()
    finally:
        daemon.stop()
    wrong = dict(settings, dmarc={"store": url.replace("@/t", "@/missing_t", 1)})
    path.write_text(yaml.safe_dump(wrong))
    checked = check_config(path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    (problem,) = json.loads(checked.stdout)["problems"]
    assert problem.startswith("cannot open the DMARC store"), problem
