"""kill -9 during a recording burst: every evaluation whose `record()` had returned (the child
prints its number right after) is in the SQLite store afterwards, and the store opens cleanly
(PRAGMA integrity_check is ok) -- whatever moment the kill hits, schema creation included.

(SIGKILL ends the process, not the machine: this checks that a commit is complete when record()
returns and that a torn transaction is rolled back, not the disk's own durability, which
synchronous=NORMAL leaves to the next checkpoint.)"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mailwarden.dmarc.store import Store

CHILD = textwrap.dedent("""
    import sys, threading
    from mailwarden.dmarc.store import Evaluation, Store
    url, first = sys.argv[1], int(sys.argv[2])
    store = Store.open(url)
    print("open", flush=True)
    lock = threading.Lock()
    def run(t):
        i = first + t
        while True:
            store.record(Evaluation(
                time=1_777_600_000.0 + i, source_ip="192.0.2.1", header_from=f"n{i}.example",
                envelope_from="example.com", envelope_to="receiver.example",
                policy_domain="example.com", p="reject", sp="", np="", adkim="r", aspf="r",
                testing=False, psd="", disposition="reject", dkim_aligned="fail",
                spf_aligned="fail", dkim=(("example.com", "s", "fail"),),
                spf=(("example.com", "mfrom", "fail"),), rua=("mailto:d@example.com",)))
            with lock:
                sys.stdout.write(f"{i}\\n")
                sys.stdout.flush()
            i += 4
    for t in range(4):
        threading.Thread(target=run, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


def burst(url: str, first: int, acks_before_kill: int) -> set[int]:
    """Run the child until it has acknowledged `acks_before_kill` records, SIGKILL it, and
    return every record it acknowledged."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(first)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    acked: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        assert child.stdout.readline() == "open\n"
        while len(acked) < acks_before_kill:
            line = child.stdout.readline()
            assert line, "the child died by itself"
            acked.add(int(line))
            assert time.monotonic() < deadline, "the child records too slowly"
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.communicate(timeout=30)[0]  # lines already in the pipe count too
    assert child.returncode == -signal.SIGKILL
    # complete lines only: the kill may tear the last one ("1234" read as "12")
    acked.update(int(line) for line in rest.split("\n")[:-1] if line.strip())
    return acked


def check(path: Path) -> set[int]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    store = Store.open(f"sqlite://{path}")  # opens cleanly, and every row reads back
    try:
        return {int(ev.header_from[1:].split(".")[0]) for ev in store.evaluations()}
    finally:
        store.close()


def test_every_acknowledged_record_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "dmarc.db"
    url = f"sqlite://{path}"
    acked_total: set[int] = set()
    for round_no, kill_after in enumerate((150, 400, 50)):
        acked = burst(url, round_no * 1_000_000, kill_after)
        assert len(acked) >= kill_after
        acked_total |= acked
        stored = check(path)
        missing = acked_total - stored
        assert not missing, f"acknowledged but lost after kill -9: {sorted(missing)[:10]}"
        # Rows stored but not acknowledged are allowed (committed in the instant before the
        # kill, or acknowledged on a line the kill cut off); two bounds on them proved to
        # depend on the machine's load, the property that matters is the one above.


def test_a_kill_at_any_moment_of_opening_leaves_a_usable_store(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, f"sqlite://{path}", "0"],
                                 stdout=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if path.exists():
            check(path)
    store = Store.open(f"sqlite://{path}")
    store.close()
    check(path)
