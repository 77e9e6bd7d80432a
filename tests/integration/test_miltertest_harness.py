"""Self-test of the miltertest harness (miltertest.py) against tinymilter.py on a unix socket."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from miltertest import lua_string, miltertest_available, miltertest_socket, run_miltertest

needs_miltertest = pytest.mark.skipif(
    not miltertest_available(),
    reason="miltertest is not installed (Debian package 'miltertest', /usr/bin/miltertest)",
)

TINYMILTER = Path(__file__).with_name("tinymilter.py")


@pytest.fixture(scope="module")
def milter_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start tinymilter.py on a unix socket; yield the socket spec; stop it afterwards."""
    tmp = tmp_path_factory.mktemp("tinymilter")
    sock = tmp / "tiny.sock"
    log = tmp / "tinymilter.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(TINYMILTER), f"unix:{sock}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tinymilter did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        yield f"unix:{sock}"
    finally:
        proc.terminate()  # libmilter takes seconds to notice SIGTERM; don't wait for it
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_miltertest
def test_accept_and_insert_header_at_top(milter_socket: str) -> None:
    script = """
local conn = mt.connect(MILTER_SOCKET, 50, 0.1)
-- connect() is @noreply: miltertest reads no reply and reports SMFIR_CONTINUE
assert(mt.test_option(conn, SMFIP_NR_CONN), "expected SMFIP_NR_CONN")
expect_ok(mt.conninfo(conn, "client.example.org", CLIENT_IP), "conninfo")
expect_reply(conn, SMFIR_CONTINUE, "conninfo")
expect_ok(mt.mailfrom(conn, "<alice@example.org>"), "mailfrom")
expect_reply(conn, SMFIR_CONTINUE, "mailfrom")
-- macros for end-of-message, sent right before mt.eom
mt.macro(conn, string.byte("E"), "i", "QID42")
expect_ok(mt.eom(conn), "eom")
expect_reply(conn, SMFIR_ACCEPT, "eom")
local want = "client=" .. CLIENT_IP .. "; qid=QID42"
assert(mt.eom_check(conn, MT_HDRINSERT, "X-Tiny-Milter", want, 0), "no insert at index 0")
assert(not mt.eom_check(conn, MT_HDRADD, "X-Tiny-Milter"), "insert counted as add")
local got = mt.getheader(conn, "X-Tiny-Milter", 0)
assert(got == want, "getheader: " .. tostring(got))
mt.echo("inserted: " .. got)
mt.disconnect(conn)
"""
    proc = run_miltertest(script, milter_socket, defines={"CLIENT_IP": "192.0.2.25"})
    assert "inserted: client=192.0.2.25; qid=QID42" in proc.stdout


@needs_miltertest
def test_reject_at_mail_from_and_reply_text_at_eom(milter_socket: str) -> None:
    script = """
local conn = mt.connect(MILTER_SOCKET, 50, 0.1)
expect_ok(mt.conninfo(conn, "client.example.org", "192.0.2.26"), "conninfo")
-- setreply("550", "5.7.1", ...) + REJECT arrives as SMFIR_REPLYCODE; text not visible here
expect_ok(mt.mailfrom(conn, "<reject@example.org>"), "mailfrom")
expect_reply(conn, SMFIR_REPLYCODE, "MAIL FROM")
-- a new transaction after the rejected MAIL (mailfrom is explicit, so EOM state is reset)
expect_ok(mt.mailfrom(conn, "<reject-at-eom@example.org>"), "mailfrom 2")
expect_reply(conn, SMFIR_CONTINUE, "MAIL FROM 2")
expect_ok(mt.eom(conn), "eom")
expect_reply(conn, SMFIR_REPLYCODE, "eom")
assert(mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "message rejected by tinymilter"))
assert(not mt.eom_check(conn, MT_SMTPREPLY, "550"), "one-argument form matched")
assert(not mt.eom_check(conn, MT_HDRINSERT), "rejected message still got a header")
mt.disconnect(conn)
"""
    run_miltertest(script, milter_socket)


@needs_miltertest
def test_negotiated_away_step_fails_with_message(milter_socket: str) -> None:
    script = """
local conn = mt.connect(MILTER_SOCKET, 50, 0.1)
mt.echo("NOHDRS=" .. tostring(mt.test_option(conn, SMFIP_NOHDRS)))
mt.header(conn, "Subject", "tinymilter has no header callback")
mt.echo("not reached")
"""
    proc = run_miltertest(script, milter_socket, check=False)
    assert proc.returncode == 1
    assert "NOHDRS=true" in proc.stdout
    assert "not reached" not in proc.stdout
    # this miltertest build prints nothing for a Lua error; the harness wrapper does
    assert "mt.header(): negotiated SMFIP_NOHDRS" in proc.stderr
    with pytest.raises(AssertionError, match="negotiated away"):
        run_miltertest(script, milter_socket)


@needs_miltertest
def test_lua_string_round_trips_through_miltertest(tmp_path: Path) -> None:
    data = bytes(range(256)) + "é ünïcødé \\ \" ' ]]\n".encode() + b"\\0001"
    out = tmp_path / "out.bin"
    script = f"""
local f = assert(io.open(OUT, "wb"))
f:write({lua_string(data)})
f:close()
"""
    run_miltertest(script, "inet:1", defines={"OUT": str(out)})  # never connects
    assert out.read_bytes() == data
    assert lua_string('a"b\\c\n\x01é') == '"a\\"b\\\\c\\n\\001\\195\\169"'


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("/run/m.sock", "unix:/run/m.sock"),
        ("local:/run/m.sock", "unix:/run/m.sock"),
        ("unix:/run/m.sock", "unix:/run/m.sock"),
        ("inet:8891@127.0.0.1", "inet:8891@127.0.0.1"),
        ("inet:8891", "inet:8891@127.0.0.1"),
    ],
)
def test_miltertest_socket(spec: str, expected: str) -> None:
    assert miltertest_socket(spec) == expected


@pytest.mark.parametrize("spec", ["inet6:8891@::1", "inet:x@127.0.0.1", "unix:/" + "x" * 120])
def test_miltertest_socket_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        miltertest_socket(spec)
