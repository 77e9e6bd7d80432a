"""`mailwarden dmarc report` run once by hand as root must not break the nightly timer, which
runs it as the daemon's user (issue 15 #5): as root it acts as the store's owner, so the report
lock (and SQLite's -wal/-shm) it creates belong to that user, and the next run as that user
works. Before, the lock stayed root:root 0640 and every later run failed."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from mailwarden.dmarc.store import Evaluation, Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, and the mailwarden user")


def report(config: Path, *as_user: str) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", as_user[0], "--"] if as_user else []
    return subprocess.run([*prefix, sys.executable, "-m", "mailwarden", "dmarc", "report",
                           "--config", str(config), "--period", "yesterday"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_root_run_leaves_files_the_daemons_user_can_use() -> None:
    try:
        user = pwd.getpwnam("mailwarden")
    except KeyError:
        pytest.skip("no mailwarden user (scripts/setup.sh creates it)")
    tmp_path = Path(tempfile.mkdtemp(prefix="mailwarden-owner-"))  # one the user can reach
    tmp_path.chmod(0o755)
    try:
        run_as_root_then_as_the_user(tmp_path, user)
    finally:
        shutil.rmtree(tmp_path)


def run_as_root_then_as_the_user(tmp_path: Path, user: pwd.struct_passwd) -> None:
    base = tmp_path / "state"
    base.mkdir()
    yesterday = (time.time() // 86400 - 1) * 86400 + 43200  # noon UTC, yesterday
    with Store.open(str(base / "dmarc.db")) as store:
        store.record(Evaluation(
            time=yesterday, source_ip="198.51.100.7", header_from="example.com",
            envelope_from="example.com", envelope_to="example.net",
            policy_domain="example.com", p="reject", sp="", np="", adkim="r", aspf="r",
            testing=False, psd="", disposition="none", dkim_aligned="pass",
            spf_aligned="pass", rua=("mailto:dmarc@example.com",)))
    for path in (base, *base.iterdir()):
        os.chown(path, user.pw_uid, user.pw_gid)
    for leftover in base.glob("dmarc.db-*"):  # as after a clean shutdown: no -wal, no -shm
        leftover.unlink()
    config = tmp_path / "mailwarden.yaml"
    config.write_text(yaml.safe_dump({
        "authserv_id": "mx.example.net", "user": "mailwarden",
        "dmarc": {"store": str(base / "dmarc.db"), "reports": {
            "org_name": "Example", "email": "dmarc@example.net",
            "directory": str(base / "out")}}}))
    config.chmod(0o644)
    done = report(config)
    assert done.returncode == 0, done.stdout + done.stderr
    created = [p for p in base.iterdir() if p.name != "dmarc.db"]  # the report lock
    assert created, "the run made no file next to the store"
    for path in created:
        assert path.stat().st_uid == user.pw_uid, (path, path.stat().st_uid)
    done = report(config, "mailwarden")  # the nightly timer
    assert done.returncode == 0, done.stdout + done.stderr
