"""Log lines under systemd's journal (issue 15 #7): the priority in front (`journalctl -p err`
finds errors), no `mailwarden[PID]:` of ours (the journal adds it: it appeared twice); on any
other stream the usual prefix."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = ("import logging; from mailwarden.logsetup import configure_logging; "
         "configure_logging('info'); log = logging.getLogger('mailwarden.test'); "
         "log.info('started'); log.warning('careful'); log.error('boom\\nsecond line')")


def run(journal: bool) -> str:
    read, write = os.pipe()
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal:  # both ends of a pipe are one inode: the child's stderr is "the" stream
        info = os.fstat(write)
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    with os.fdopen(read, "rb") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stderr=write, env=env)
        os.close(write)
        text = out.read().decode()
    assert child.wait(30) == 0
    return text


def test_under_the_journal_lines_carry_their_priority() -> None:
    assert run(journal=True).splitlines() == [
        "<6>started", "<4>careful", "<3>boom", "<3>second line"]


def test_elsewhere_lines_carry_the_daemons_name() -> None:
    lines = run(journal=False).splitlines()
    assert lines[0].startswith("mailwarden[") and lines[0].endswith("]: INFO started"), lines
    assert lines[2].endswith(": ERROR boom"), lines
