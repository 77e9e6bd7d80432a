"""`mailwarden dmarc check` and `mailwarden dmarc report` as an administrator runs them."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_dmarc_reports import evaluation, xmllint

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dmarc.store import Store


def mailwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_dmarc_check_prints_the_policy_and_every_problem(dns_server: DevDNSServer) -> None:
    dns_server.load({"_dmarc.example.com": [
        {"TXT": "v=DMARC1; p=quarantine; pct=50; rua=mailto:d@example.com,https://x; bad=1"}]})
    done = mailwarden("dmarc", "check", "mail.example.com", "--json",
                      "--nameserver", f"127.0.0.1:{dns_server.port}")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["policy_domain"] == "example.com"
    assert data["organizational_domain"] == "example.com"
    assert data["effective"]["p"] == "quarantine" and data["effective"]["np"] == "quarantine"
    problems = " ".join(data["problems"])
    for word in ("pct=", "bad=", "https://x"):
        assert word in problems, problems
    assert data["queries"] <= 8


def test_dmarc_report_writes_a_valid_gzipped_report(tmp_path: Path) -> None:
    store_path = tmp_path / "dmarc.db"
    store = Store.open(str(store_path))
    yesterday = time.time() - 86400
    day_start = yesterday - yesterday % 86400 + 3600
    try:
        for _ in range(3):
            store.record(evaluation(time=day_start))
    finally:
        store.close()
    out = tmp_path / "reports"
    out.mkdir()
    config = {
        "authserv_id": "mx.receiver.example",
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.2},
        "dmarc": {"store": str(store_path),
                  "reports": {"org_name": "Receiver", "email": "r@receiver.example",
                              "directory": str(out)}},
    }
    path = tmp_path / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(config))
    dry = mailwarden("dmarc", "report", "--config", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert list(out.iterdir()) == []
    done = mailwarden("dmarc", "report", "--config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    files = list(out.glob("*.xml.gz"))
    assert len(files) == 1, done.stdout
    xml = gzip.decompress(files[0].read_bytes())
    assert b"<count>3</count>" in xml
    if shutil.which("xmllint") is None:
        pytest.skip("xmllint (libxml2-utils) is not installed: schema validation not run")
    xmllint(xml, tmp_path)


def test_dmarc_check_exits_75_when_dns_fails_for_now() -> None:
    """EX_TEMPFAIL, as `dkim verify`: a script can tell "try again" from "no policy"."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes queries, never answers
        port = silent.getsockname()[1]
        done = mailwarden("dmarc", "check", "example.com", "--timeout", "0.2",
                          "--nameserver", f"127.0.0.1:{port}")
    assert done.returncode == 75, (done.returncode, done.stdout, done.stderr)
    assert "DNS error" in done.stderr
