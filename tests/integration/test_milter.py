"""The daemon over the milter protocol, driven by Debian's miltertest (an independent client),
resolving through the loopback DNS server: every stage, header edits, replies, bad input."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon import Daemon
from miltertest import lua_string, miltertest_available, run_miltertest

from mailwarden.devtools.devdns import DevDNSServer

pytestmark = pytest.mark.skipif(not miltertest_available(),
                                reason="Debian's miltertest is not installed")

ZONE = {
    "pass.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "fail.example": [{"TXT": "v=spf1 -all exp=why.fail.example"}],
    "why.fail.example": [{"TXT": "%{i} may not send for %{d}"}],
    "soft.example": [{"TXT": "v=spf1 ~all"}],
    "slow.example": ["TIMEOUT"],
    "1.2.0.192.in-addr.arpa": [{"PTR": "good.client.example"}],
    "good.client.example": [{"A": "192.0.2.1"}],
    "2.2.0.192.in-addr.arpa": [{"PTR": "liar.client.example"}],
    "liar.client.example": [{"A": "192.0.2.99"}],
}


@pytest.fixture(scope="module", params=["libmilter", "native"])
def daemon(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Daemon]:
    dns_server.load(ZONE)
    workdir = tmp_path_factory.mktemp(f"milter-{request.param}")
    config = {
        "transport": request.param,
        "listen": f"unix:{workdir}/milter.sock",
        "authserv_id": "mx.test.example",
        "workers": 2,
        "drain_timeout": 5,
        "log_level": "info",
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.3,
                "lifetime": 0.6},
        "domains": ["ours.example"],
        "hosts": {"internal": ["10.0.0.0/8", "2001:db8:1::/48"]},
        "rules": {
            "connect": [{"name": "iprev", "check": "iprev", "on": {"fail": "reject"}}],
            "mail": [
                {"name": "no spoofing", "check": "mail_relay", "allowed_hosts": "internal"},
                {"name": "spf", "check": "spf", "header": "both", "policy": "soft",
                 "on": {"softfail": {"action": "quarantine", "text": "SPF softfail"}}},
            ],
            "rcpt": [{"name": "relay", "check": "rcpt_relay", "allowed_hosts": "internal"}],
        },
    }
    with Daemon(workdir, config) as running:
        yield running


@dataclass
class Message:
    ip: str = "192.0.2.1"
    client_name: str = "good.client.example"
    helo: str | None = "good.client.example"
    mail_from: str = "alice@pass.example"
    rcpts: Sequence[str] = ("bob@ours.example",)
    headers: Sequence[tuple[str, str]] = (("From", "alice@pass.example"), ("Subject", "hi"))
    body: str = "hello\r\n"
    mail_macros: dict[str, str] = field(default_factory=lambda: {"i": "QID1"})
    eom: bool = True
    expect_reply: tuple[str, str, str] | None = None


def script_for(message: Message) -> str:
    """A Lua script that runs one transaction and echoes what the milter answered."""
    lines = [
        "local conn = mt.connect(MILTER_SOCKET, 50, 0.1)",
        f"expect_ok(mt.conninfo(conn, {lua_string(message.client_name)}, "
        f"{lua_string(message.ip)}), 'conninfo')",
    ]
    if message.helo is not None:
        lines += [f"expect_ok(mt.helo(conn, {lua_string(message.helo)}), 'helo')",
                  "mt.echo('REPLY helo ' .. reply_name(mt.getreply(conn)))"]
    macro_args = ", ".join(f"{lua_string(k)}, {lua_string(v)}"
                           for k, v in message.mail_macros.items())
    if macro_args:
        lines.append(f"mt.macro(conn, SMFIC_MAIL, {macro_args})")
    lines += [f"expect_ok(mt.mailfrom(conn, {lua_string('<' + message.mail_from + '>')}), "
              "'mailfrom')",
              "mt.echo('REPLY mail ' .. reply_name(mt.getreply(conn)))",
              "if mt.getreply(conn) ~= SMFIR_CONTINUE then mt.disconnect(conn) return end"]
    for rcpt in message.rcpts:
        lines += [f"expect_ok(mt.rcptto(conn, {lua_string('<' + rcpt + '>')}), 'rcpt')",
                  f"mt.echo('REPLY rcpt {rcpt} ' .. reply_name(mt.getreply(conn)))"]
    for name, value in message.headers:
        lines.append(f"expect_ok(mt.header(conn, {lua_string(name)}, {lua_string(value)}), "
                     "'header')")
    lines += ["if not mt.test_option(conn, SMFIP_NOEOH) then expect_ok(mt.eoh(conn), 'eoh') end",
              "if not mt.test_option(conn, SMFIP_NOBODY) then "
              f"expect_ok(mt.bodystring(conn, {lua_string(message.body)}), 'body') end"]
    if not message.eom:
        lines.append("mt.disconnect(conn) do return end")
    lines += [
        "mt.macro(conn, string.byte('E'), 'i', 'QID1')",
        "expect_ok(mt.eom(conn), 'eom')",
        "mt.echo('REPLY eom ' .. reply_name(mt.getreply(conn)))",
        "for _, name in ipairs({'Authentication-Results', 'Received-SPF'}) do",
        "  local i = 0",
        "  while true do",
        "    local h = mt.getheader(conn, name, i)",
        "    if h == nil then break end",
        "    mt.echo('HEADER ' .. name .. ': ' .. h)",
        "    i = i + 1",
        "  end",
        "end",
        "for n = 1, 4 do",
        "  if mt.eom_check(conn, MT_HDRDELETE, 'Authentication-Results', n) then",
        "    mt.echo('DELETED ' .. n) end",
        "end",
        "if mt.eom_check(conn, MT_QUARANTINE) then mt.echo('QUARANTINED') end",
        "local ar = mt.getheader(conn, 'Authentication-Results', 0)",
        "if ar and mt.eom_check(conn, MT_HDRINSERT, 'Authentication-Results', ar, 0) then",
        "  mt.echo('INSERTED AT TOP') end",
    ]
    if message.expect_reply:
        code, status, text = message.expect_reply
        lines += [f"if mt.eom_check(conn, MT_SMTPREPLY, {lua_string(code)}, "
                  f"{lua_string(status)}, {lua_string(text)}) then mt.echo('REPLY TEXT OK') end"]
    lines.append("mt.disconnect(conn)")
    return "\n".join(lines) + "\n"


@dataclass
class Seen:
    replies: dict[str, str]
    headers: list[str]
    deleted: list[int]
    quarantined: bool
    stdout: str


def run(daemon: Daemon, message: Message) -> Seen:
    done = run_miltertest(script_for(message), daemon.socket)
    replies: dict[str, str] = {}
    headers, deleted = [], []
    for line in done.stdout.splitlines():
        reply = re.match(r"REPLY (.+) (SMFIR_\w+|\S+) \(", line)
        if reply:
            replies[reply.group(1)] = reply.group(2)
        elif line[:1] in (" ", "\t") and headers:
            headers[-1] += line  # a folded field: its next line (unfolded, RFC 5322 §2.2.3)
        elif line.startswith("HEADER "):
            # values carry their leading space (SMFIP_HDR_LEADSPC is negotiated)
            headers.append(re.sub(r"^([^:]+): +", r"\1: ", line[7:]))
        elif line.startswith("DELETED "):
            deleted.append(int(line[8:]))
    return Seen(replies, headers, deleted, "QUARANTINED" in done.stdout, done.stdout)


def _ar(seen: Seen) -> str:
    found = [h for h in seen.headers if h.startswith("Authentication-Results: ")]
    assert len(found) == 1, seen.stdout
    return found[0].removeprefix("Authentication-Results: ")


def test_pass_adds_authentication_results_and_received_spf_at_the_top(daemon: Daemon) -> None:
    seen = run(daemon, Message())
    assert seen.replies["mail"] == "SMFIR_CONTINUE", seen.stdout
    assert seen.replies["rcpt bob@ours.example"] == "SMFIR_CONTINUE"
    assert seen.replies["eom"] == "SMFIR_CONTINUE"
    assert "INSERTED AT TOP" in seen.stdout
    assert _ar(seen) == ("mx.test.example; iprev=pass (good.client.example) "
                         "policy.iprev=192.0.2.1; spf=none smtp.helo=good.client.example; "
                         "spf=pass smtp.mailfrom=alice@pass.example")
    received = [h for h in seen.headers if h.startswith("Received-SPF: pass (mx.test.example: ")]
    assert len(received) == 1
    assert "client-ip=192.0.2.1;" in received[0]
    log = daemon.wait_for_log("queue_id=QID1 client=good.client.example[192.0.2.1]")
    assert re.search(r"stage=eom results=\"iprev=pass mail_relay=pass\(alice@pass.example\) "
                     r"spf=none\(good.client.example\) spf=pass\(alice@pass.example\) "
                     r"rcpt_relay=pass\(bob@ours.example\)\" verdict=continue", log), log


def test_forged_authentication_results_are_deleted(daemon: Daemon) -> None:
    headers = (("Authentication-Results", "MX.Test.Example; spf=pass smtp.mailfrom=x"),
               ("Authentication-Results", "other.example; spf=fail"),
               ("Authentication-Results", " (forged) mx.test.example; dkim=pass"),
               ("Subject", "forged"))
    seen = run(daemon, Message(headers=headers))
    assert seen.deleted == [1, 3], seen.stdout
    assert _ar(seen).startswith("mx.test.example; iprev=pass")


def test_spf_fail_is_refused_at_mail_from(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_from="mallory@fail.example"))
    assert seen.replies["mail"] == "SMFIR_REPLYCODE", seen.stdout
    daemon.wait_for_log('reply="550 5.7.23 SPF fail: 192.0.2.1 may not send for fail.example"')


def test_spf_temperror_is_a_temporary_refusal(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_from="someone@slow.example"))
    assert seen.replies["mail"] == "SMFIR_REPLYCODE"
    # the client is told no more than the check's text; the log line has the cause
    log = daemon.wait_for_log('verdict=tempfail rule=spf check=spf reply="451 4.7.24 SPF '
                              'validation error, try again later" cause="')
    assert re.search(r'cause="[^"]*(timeout|DNS)', log), log


def test_spf_softfail_is_quarantined_by_the_rule_override(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_from="someone@soft.example"))
    assert seen.replies["mail"] == "SMFIR_CONTINUE"
    assert seen.quarantined, seen.stdout
    assert "spf=softfail smtp.mailfrom=someone@soft.example" in _ar(seen)
    daemon.wait_for_log('quarantine="SPF softfail"')


def test_open_relay_is_refused_per_recipient(daemon: Daemon) -> None:
    seen = run(daemon, Message(rcpts=("carol@elsewhere.example", "bob@ours.example")))
    assert seen.replies["rcpt carol@elsewhere.example"] == "SMFIR_REPLYCODE", seen.stdout
    assert seen.replies["rcpt bob@ours.example"] == "SMFIR_CONTINUE"
    daemon.wait_for_log('reply="554 5.7.1 <carol@elsewhere.example>: Relay access denied"')


def test_internal_hosts_may_relay(daemon: Daemon) -> None:
    seen = run(daemon, Message(ip="10.1.2.3", client_name="inside.ours.example",
                               helo="inside.ours.example", mail_from="alice@ours.example",
                               rcpts=("carol@elsewhere.example",)))
    assert seen.replies["mail"] == "SMFIR_CONTINUE", seen.stdout
    assert seen.replies["rcpt carol@elsewhere.example"] == "SMFIR_CONTINUE"


def test_authenticated_clients_may_relay_and_use_our_domains(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_from="alice@ours.example", rcpts=("c@elsewhere.example",),
                               mail_macros={"i": "QID2", "{auth_authen}": "alice"}))
    assert seen.replies["mail"] == "SMFIR_CONTINUE", seen.stdout
    assert seen.replies["rcpt c@elsewhere.example"] == "SMFIR_CONTINUE"


def test_outsiders_may_not_use_our_domains(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_from="ceo@ours.example"))
    assert seen.replies["mail"] == "SMFIR_REPLYCODE", seen.stdout
    daemon.wait_for_log("Sender address <ceo@ours.example> is not allowed from "
                        "good.client.example[192.0.2.1]")


def test_iprev_fail_at_connect_is_refused_at_helo(daemon: Daemon) -> None:
    """smfi_setreply() cannot be used in xxfi_connect: the refusal comes at HELO."""
    seen = run(daemon, Message(ip="192.0.2.2", client_name="liar.client.example",
                               helo="liar.client.example"))
    assert seen.replies["helo"] == "SMFIR_REPLYCODE", seen.stdout
    daemon.wait_for_log('verdict=reject rule=iprev check=iprev reply="550 5.7.25 Reverse DNS of '
                        '192.0.2.2')


def test_iprev_without_ptr_is_recorded_not_refused(daemon: Daemon) -> None:
    seen = run(daemon, Message(ip="192.0.2.3", client_name="unknown", helo="h.pass.example"))
    assert seen.replies["mail"] == "SMFIR_CONTINUE", seen.stdout
    assert "iprev=permerror policy.iprev=192.0.2.3" in _ar(seen)


def test_negotiation_skips_what_no_rule_needs(daemon: Daemon) -> None:
    script = "\n".join([
        "local conn = mt.connect(MILTER_SOCKET, 50, 0.1)",
        "for _, o in ipairs({'SMFIP_NR_CONN', 'SMFIP_NR_HDR', 'SMFIP_NOEOH', 'SMFIP_NOBODY',",
        "                    'SMFIP_NOUNKNOWN', 'SMFIP_NODATA', 'SMFIP_NR_HELO', 'SMFIP_NR_MAIL',",
        "                    'SMFIP_NR_RCPT', 'SMFIP_NOHDRS'}) do",
        "  if mt.test_option(conn, _G[o]) then mt.echo('ON ' .. o) end",
        "end",
        "mt.disconnect(conn)",
    ]) + "\n"
    done = run_miltertest(script, daemon.socket)
    on = {line[3:] for line in done.stdout.splitlines() if line.startswith("ON ")}
    # stages that never answer are no-reply; unused stages are not sent; stages with rules
    # (connect -> answered at HELO, mail, rcpt) answer.
    assert on == {"SMFIP_NR_CONN", "SMFIP_NR_HDR", "SMFIP_NOEOH", "SMFIP_NOBODY",
                  "SMFIP_NOUNKNOWN", "SMFIP_NODATA"}, done.stdout


# -- bad input: the daemon logs each case and keeps serving ------------------------------------

def _still_serving(daemon: Daemon) -> None:
    seen = run(daemon, Message())
    assert seen.replies["eom"] == "SMFIR_CONTINUE", seen.stdout


def test_empty_helo(daemon: Daemon) -> None:
    """An empty HELO name (a truly missing HELO is tested through Postfix)."""
    seen = run(daemon, Message(helo=""))
    assert seen.replies["mail"] == "SMFIR_CONTINUE", seen.stdout
    assert "spf=pass smtp.mailfrom=alice@pass.example" in _ar(seen)
    assert "smtp.helo" not in _ar(seen)
    _still_serving(daemon)


def test_malformed_macros(daemon: Daemon) -> None:
    seen = run(daemon, Message(mail_macros={"i": "Q\x01\xff;\r\n", "{auth_authen}": "\xff\xfe",
                                            "{": "}"}))
    assert seen.replies["eom"] == "SMFIR_CONTINUE", seen.stdout
    _still_serving(daemon)


def test_non_ascii_envelope(daemon: Daemon) -> None:
    seen = run(daemon, Message(helo="h\xe9lo.example", mail_from="j\xfcrgen@pass.example",
                               rcpts=("b\xf6b@ours.example",)))
    assert seen.replies["eom"] == "SMFIR_CONTINUE", seen.stdout
    assert "\r" not in _ar(seen) and all(" " <= ch <= "~" for ch in _ar(seen))
    _still_serving(daemon)


def test_a_thousand_headers(daemon: Daemon) -> None:
    headers = [(f"X-Filler-{i}", f"value {i}") for i in range(1000)]
    seen = run(daemon, Message(headers=[("From", "a@pass.example"), *headers]))
    assert seen.replies["eom"] == "SMFIR_CONTINUE", seen.stdout
    _still_serving(daemon)


def test_empty_body(daemon: Daemon) -> None:
    seen = run(daemon, Message(body=""))
    assert seen.replies["eom"] == "SMFIR_CONTINUE", seen.stdout
    _still_serving(daemon)


def test_connection_dropped_mid_message(daemon: Daemon) -> None:
    run(daemon, Message(eom=False, mail_macros={"i": "DROPPED1"}))
    daemon.wait_for_log("queue_id=DROPPED1")
    log = daemon.log()
    line = next(x for x in log.splitlines() if "queue_id=DROPPED1" in x)
    assert "connection closed in the middle of a message" in line or "aborted" in line
    _still_serving(daemon)
    assert "Traceback" not in daemon.log()


def test_sighup_reload_keeps_serving_and_refuses_a_broken_config(daemon: Daemon,
                                                                 tmp_path: Path) -> None:
    import signal

    good = dict(daemon.config)
    broken = dict(good)
    broken["rules"] = {"mail": [{"name": "spf", "check": "spf", "polcy": "strict"}]}
    daemon.write_config(broken)
    daemon.signal(signal.SIGHUP)
    log = daemon.wait_for_log("reload refused")
    assert re.search(r"mailwarden\.yaml:\d+: rules\.mail\[0\]\.polcy: unknown key", log), log
    _still_serving(daemon)
    daemon.write_config(good)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("configuration reloaded")
    _still_serving(daemon)


@pytest.mark.parametrize("transport", ["libmilter", "native"])
def test_sigterm_lets_the_transaction_in_progress_finish(dns_server: DevDNSServer,
                                                         tmp_path: Path, transport: str) -> None:
    import signal
    import threading
    import time

    dns_server.load(ZONE)
    config = {
        "transport": transport,
        "listen": f"unix:{tmp_path}/milter.sock", "authserv_id": "mx.test.example",
        "workers": 1, "drain_timeout": 10,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.3},
        "rules": {"mail": [{"name": "spf", "check": "spf"}]},
    }
    slow = script_for(Message()).replace("mt.macro(conn, string.byte('E')",
                                         "mt.sleep(2)\nmt.macro(conn, string.byte('E')")
    with Daemon(tmp_path, config) as daemon:
        outcome: dict[str, str] = {}

        def client() -> None:
            outcome["stdout"] = run_miltertest(slow, daemon.socket).stdout

        thread = threading.Thread(target=client)
        thread.start()
        daemon.wait_for_log("started")
        time.sleep(1.0)  # the transaction is now between its headers and its end
        daemon.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert not Path(f"{tmp_path}/milter.sock").exists()  # no new connections
        thread.join(30)
        assert daemon.process is not None
        assert daemon.process.wait(30) == 0
    assert "REPLY eom SMFIR_CONTINUE" in outcome["stdout"]
    assert "INSERTED AT TOP" in outcome["stdout"]
    assert "stopped" in daemon.log()
