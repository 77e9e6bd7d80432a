"""The milter wire protocol: the pure codec (`mailwarden.milterproto`) and the per-connection
state machine (`mailwarden.transports.native.Session`) driven directly with packets, no socket.

Packets sent to the Session and replies read back are built and decoded here with `struct`,
independently of the codec under test, so an error in `milterproto` cannot hide itself."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from miltercodec import (
    SMFIF_ALL,
    SMFIP_ALL,
    connect_data,
    cstr,
    header_data,
    index_edit,
    macro_data,
    optneg,
    packet,
    split_packets,
)

from mailwarden import milterproto as mp
from mailwarden.config.build import parse
from mailwarden.daemon import build_runtime
from mailwarden.policy.engine import Engine
from mailwarden.transports.native import ACTIVE, Runtime, Session

from fakedns import FakeDNS

AUTHSERV = "mx.example.com"
AR = "Authentication-Results"
# No rule below asks the DNS anything; the resolver is pointed at a closed port all the same.
CONFIG = f"""\
authserv_id: {AUTHSERV}
dns: {{nameservers: ["127.0.0.1:9"], timeout: 0.1, lifetime: 0.2}}
domains: [ours.example]
hosts: {{internal: [10.0.0.0/8]}}
rules:
  rcpt:
    - name: relay
      check: rcpt_relay
      allowed_hosts: internal
"""
PERCENT_CONFIG = CONFIG + '      on: {fail: {action: reject, text: "100% not a relay"}}\n'
# A check whose result goes into Authentication-Results without the DNS (an unsigned message
# is dkim=none): with no reported result no field is written at all.
REPORTING_CONFIG = CONFIG + "  eom:\n    - {name: dkim, check: dkim_verify}\n"

# Offers as an MTA makes them (Postfix 3.x / milterload: every action, every v6 step).
ALL_ACTIONS = SMFIF_ALL
ALL_STEPS = SMFIP_ALL
# SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE | SMFIF_SETSYMLIST
WANTED = 0x01 | 0x10 | 0x20 | 0x100
# What a configuration with only a RCPT rule asks for: no reply at connect, HELO, MAIL, for
# headers and body; DATA, EOH, unknown commands and the body are not sent; header values keep
# their leading space.
RCPT_ONLY_STEPS = (0x1000 | 0x2000 | 0x4000 | 0x80 | 0x80000 | 0x40 | 0x200 | 0x100 | 0x10
                   | 0x100000)

INTERNAL_ERROR = ("y", b"451 4.3.0 Internal error, try again later\0")


# -- raw packets, built and read by the MTA-side codec (benchmarks/miltercodec.py), not by
# milterproto
def pkt(command: str, data: bytes = b"") -> bytes:
    return packet(command.encode(), data)


def replies(raw: bytes | None) -> list[tuple[str, bytes]]:
    """The packets in `raw` as (command letter, data); the stream must end on a packet end."""
    assert raw is not None, "expected a reply, got none"
    return [(command.decode(), data) for command, data in split_packets(raw)]


def connect4(ip: str = "192.0.2.1", name: str = "client.example.net", port: int = 4000) -> bytes:
    return connect_data(name, ip, port)


def macros(command: str, **values: str) -> bytes:
    return macro_data(command.encode(), values)


def header(name: str, value: str) -> bytes:
    return header_data(name, value)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def runtime() -> Runtime:
    return build_runtime(parse(CONFIG))


@pytest.fixture
def session(runtime: Runtime) -> Iterator[Session]:
    s = Session(runtime)
    yield s
    s.close()


@pytest.fixture
def reporting() -> Iterator[Session]:
    s = Session(build_runtime(parse(REPORTING_CONFIG)))
    yield s
    s.close()


def start(s: Session, *, actions: int = ALL_ACTIONS, protocol: int = ALL_STEPS,
          ip: str = "192.0.2.1") -> list[tuple[str, bytes]]:
    """Negotiate, CONNECT and HELO; the negotiation reply."""
    answer = replies(s.handle(mp.C_OPTNEG, optneg(actions, protocol)))
    s.handle(mp.C_CONNECT, connect4(ip))
    s.handle(mp.C_HELO, cstr("helo.example.net"))
    return answer


def send_message(s: Session, rcpt: str = "bob@ours.example", *, queue_id: str | None = None,
                 headers: tuple[tuple[str, str], ...] = (("Subject", " hi"),)
                 ) -> list[tuple[str, bytes]]:
    """One message (macros i at MAIL and EOM when `queue_id` is given); the EOM replies."""
    if queue_id is not None:
        s.handle(mp.C_MACRO, macros("M", i=queue_id))
    assert s.handle(mp.C_MAIL, cstr("<alice@sender.example>")) is None
    assert replies(s.handle(mp.C_RCPT, cstr(f"<{rcpt}>"))) == [("c", b"")]
    for name, value in headers:
        assert s.handle(mp.C_HEADER, header(name, value)) is None
    if queue_id is not None:
        s.handle(mp.C_MACRO, macros("E", i=queue_id))
    return replies(s.handle(mp.C_EOB, b""))


# == milterproto: framing ======================================================================
STREAM = [("O", optneg()), ("D", macros("C", j="mx")), ("C", connect4()), ("A", b""),
          ("B", b"x" * 300)]


def test_split_packets_takes_several_packets_from_one_buffer() -> None:
    buffer = bytearray(b"".join(pkt(c, d) for c, d in STREAM))
    assert mp.split_packets(buffer) == [(ord(c), d) for c, d in STREAM]
    assert buffer == b""


def test_split_packets_leaves_a_partial_packet_for_the_next_read() -> None:
    first, second = pkt("M", cstr("<a@b.example>")), pkt("R", cstr("<c@d.example>"))
    buffer = bytearray(first + second[:7])
    assert mp.split_packets(buffer) == [(ord("M"), cstr("<a@b.example>"))]
    assert buffer == second[:7]
    assert mp.split_packets(buffer) == []  # nothing new: nothing taken, nothing lost
    assert buffer == second[:7]
    buffer += second[7:]
    assert mp.split_packets(buffer) == [(ord("R"), cstr("<c@d.example>"))]
    assert buffer == b""


def test_split_packets_at_every_cut_of_the_stream() -> None:
    """However the reads cut the stream (inside the length, after it, inside the data), the
    same packets come out, in order, each exactly once."""
    stream = b"".join(pkt(c, d) for c, d in STREAM)
    expected = [(ord(c), d) for c, d in STREAM]
    for cut in range(len(stream) + 1):
        buffer = bytearray(stream[:cut])
        found = mp.split_packets(buffer)
        buffer += stream[cut:]
        found += mp.split_packets(buffer)
        assert found == expected, cut
        assert buffer == b""
    buffer, found = bytearray(), []
    for byte in stream:  # one byte per read
        buffer.append(byte)
        found += mp.split_packets(buffer)
    assert found == expected


def test_a_packet_of_only_a_command_byte() -> None:
    assert mp.split_packets(bytearray(b"\0\0\0\x01Q")) == [(ord("Q"), b"")]
    assert mp.packet(mp.R_CONTINUE) == b"\0\0\0\x01c"


@pytest.mark.parametrize("length", [0, mp.MAX_PACKET + 1, 2**31, 2**32 - 1])
def test_a_length_out_of_range_is_a_protocol_error(length: int) -> None:
    buffer = bytearray(struct.pack(">I", length) + b"B" + b"x" * 16)
    with pytest.raises(mp.ProtocolError, match=f"packet length {length} out of range"):
        mp.split_packets(buffer)


def test_a_bad_length_after_good_packets_is_still_an_error() -> None:
    buffer = bytearray(pkt("A") + struct.pack(">I", 0) + b"Q")
    with pytest.raises(mp.ProtocolError):
        mp.split_packets(buffer)


def test_the_largest_packet_is_accepted() -> None:
    data = b"b" * (mp.MAX_PACKET - 1)
    buffer = bytearray(pkt("B", data))
    assert struct.unpack_from(">I", buffer)[0] == mp.MAX_PACKET
    assert mp.split_packets(buffer) == [(ord("B"), data)]


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(mp.ProtocolError):
        mp.split_packets(bytearray(b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n"))


# == milterproto: decoding ======================================================================
def test_parse_connect_ipv4() -> None:
    info = mp.parse_connect(connect4("192.0.2.7", "mail.example.net", 25025))
    assert info == mp.Connect("mail.example.net", "4", 25025, "192.0.2.7")


@pytest.mark.parametrize("address", ["2001:db8::25", "IPv6:2001:db8::25", "ipv6:2001:db8::25"])
def test_parse_connect_ipv6_with_and_without_sendmails_prefix(address: str) -> None:
    data = b"[2001:db8::25]\0" + b"6" + struct.pack(">H", 40001) + address.encode() + b"\0"
    assert mp.parse_connect(data) == mp.Connect("[2001:db8::25]", "6", 40001, "2001:db8::25")


def test_parse_connect_unix_socket_and_unknown_family() -> None:
    local = b"localhost\0L" + struct.pack(">H", 0) + b"/run/smtp.sock\0"
    assert mp.parse_connect(local) == mp.Connect("localhost", "L", 0, "/run/smtp.sock")
    assert mp.parse_connect(b"unknown\0U") == mp.Connect("unknown", "U", 0, "")


@pytest.mark.parametrize("data", [b"", b"host.example", b"host.example\0"])
def test_parse_connect_without_a_family_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(mp.ProtocolError):
        mp.parse_connect(data)


def test_parse_connect_keeps_undecodable_bytes() -> None:
    info = mp.parse_connect(b"h\xffst\0U")
    assert info.hostname.encode("utf-8", "surrogateescape") == b"h\xffst"


def test_parse_macros_with_and_without_braces() -> None:
    data = b"M{auth_authen}\0alice\0i\0Q1\0{mail_addr}\0a@b.example\0"
    assert mp.parse_macros(data) == (ord("M"), {"auth_authen": "alice", "i": "Q1",
                                                "mail_addr": "a@b.example"})
    assert mp.parse_macros(b"Cj\0mx.example\0") == (ord("C"), {"j": "mx.example"})
    # a bare brace is a name of its own, not an empty one
    assert mp.parse_macros(b"M{\0}\0") == (ord("M"), {"{": "}"})
    assert mp.macro_key("{auth_authen}") == mp.macro_key("auth_authen") == "auth_authen"


def test_parse_macros_edge_cases() -> None:
    assert mp.parse_macros(b"E") == (ord("E"), {})  # a stage without macros
    assert mp.parse_macros(b"Mi\0Q1\0dangling\0") == (ord("M"), {"i": "Q1"})
    with pytest.raises(mp.ProtocolError):
        mp.parse_macros(b"")


def test_parse_options_and_header() -> None:
    assert mp.parse_options(optneg(0x1FF, 0x1FFFFF) + b"extra") == mp.Options(6, 0x1FF,
                                                                                   0x1FFFFF)
    with pytest.raises(mp.ProtocolError):
        mp.parse_options(b"\0" * 11)
    assert mp.parse_header(header("Subject", " hi")) == ("Subject", " hi")
    assert mp.parse_header(b"Subject\0") == ("Subject", "")
    with pytest.raises(mp.ProtocolError):
        mp.parse_header(b"Subject: no separator")


# == milterproto: encoding ======================================================================
def test_reply_code_keeps_the_escaped_percent_and_drops_line_breaks() -> None:
    # the text arrives escaped by policy.codes.smtp_text: '%%' stays '%%' on the wire
    assert replies(mp.reply_code(550, "5.7.1", "100%% sure")) == [
        ("y", b"550 5.7.1 100%% sure\0")]
    [(command, data)] = replies(mp.reply_code(451, "4.3.0", "a\r\n250 ok\nb\rc"))
    assert command == "y"
    assert b"\r" not in data and b"\n" not in data
    assert data == b"451 4.3.0 a  250 ok b c\0"


def test_header_edits_and_options_reply_layout() -> None:
    assert replies(mp.header_edit(mp.R_INSHEADER, AR, " x; none", 0)) == [
        ("i", b"\0\0\0\0Authentication-Results\0 x; none\0")]
    assert replies(mp.header_edit(mp.R_CHGHEADER, AR, "", 3)) == [
        ("m", b"\0\0\0\x03Authentication-Results\0\0")]
    assert replies(mp.header_edit(mp.R_ADDHEADER, "X-A", "b")) == [("h", b"X-A\0b\0")]
    assert replies(mp.quarantine("spam")) == [("q", b"spam\0")]
    [(command, data)] = replies(mp.options_reply(6, 0x31, 0x40, {5: "i", 0: "j {daemon_name}"}))
    assert command == "O"
    assert data == (struct.pack(">III", 6, 0x31, 0x40) + struct.pack(">I", 0)
                    + b"j {daemon_name}\0" + struct.pack(">I", 5) + b"i\0")


# == Session: negotiation =====================================================================
def symlists(data: bytes) -> dict[int, set[str]]:
    found, rest = {}, data[12:]
    while rest:
        (stage,) = struct.unpack_from(">I", rest)
        names, sep, rest = rest[4:].partition(b"\0")
        assert sep, data
        found[stage] = set(names.decode().split())
    return found


@pytest.mark.parametrize(("version", "actions", "protocol"), [
    (6, ALL_ACTIONS, ALL_STEPS),  # Postfix, Sendmail 8.14+
    (6, ALL_ACTIONS & ~0x100, ALL_STEPS),  # no smfi_setsymlist
    (2, 0x01 | 0x02 | 0x10, 0x3F),  # an old MTA: version 2, few actions and steps
    (7, 0x01, 0),  # a newer MTA: we still speak 6; it may not let us change headers
    (6, 0, 0x100000),  # no actions at all, only HDR_LEADSPC
])
def test_negotiation_takes_only_what_was_offered(runtime: Runtime, version: int, actions: int,
                                                 protocol: int) -> None:
    s = Session(runtime)
    try:
        [(command, data)] = replies(s.handle(mp.C_OPTNEG, optneg(actions, protocol, version)))
    finally:
        s.close()
    assert command == "O"
    got_version, got_actions, got_protocol = struct.unpack_from(">III", data)
    assert got_version == min(version, 6)
    assert got_actions == actions & WANTED
    assert got_protocol == protocol & RCPT_ONLY_STEPS
    if actions & 0x100:  # SMFIF_SETSYMLIST: the macros we need, per stage
        assert symlists(data) == {0: {"j", "{daemon_name}", "{client_addr}"},
                                  2: {"i", "{auth_authen}"}, 5: {"i"}}
    else:
        assert len(data) == 12


def test_negotiation_asks_for_the_body_only_when_a_rule_needs_it() -> None:
    config = parse(CONFIG + "  eom:\n    - name: dkim\n      check: dkim_verify\n")
    s = Session(build_runtime(config))
    try:
        [(_, data)] = replies(s.handle(mp.C_OPTNEG, optneg()))
    finally:
        s.close()
    protocol = struct.unpack_from(">III", data)[2]
    assert protocol & mp.P_NOBODY == 0
    assert protocol & mp.P_NR_BODY  # body chunks are taken without a reply
    assert protocol == RCPT_ONLY_STEPS & ~mp.P_NOBODY


def test_a_short_negotiation_is_a_protocol_error(session: Session) -> None:
    with pytest.raises(mp.ProtocolError):
        session.handle(mp.C_OPTNEG, b"\0\0\0\x06")


# == Session: replies per stage =================================================================
def test_no_reply_stages_answer_nothing(session: Session) -> None:
    start(session)  # CONNECT and HELO: see the next test
    assert session.handle(mp.C_MACRO, macros("M", i="Q1")) is None
    assert session.handle(mp.C_MAIL, cstr("<alice@sender.example>")) is None
    assert replies(session.handle(mp.C_RCPT, cstr("<bob@ours.example>"))) == [("c", b"")]
    assert session.handle(mp.C_HEADER, header("Subject", " hi")) is None
    assert session.handle(mp.C_BODY, b"hello\r\n") is None
    # DATA and EOH were negotiated away, not made no-reply: sent anyway, they get an answer
    assert replies(session.handle(mp.C_DATA, b"")) == [("c", b"")]
    assert replies(session.handle(mp.C_EOH, b"")) == [("c", b"")]
    assert session.handle(mp.C_ABORT, b"") is None


def test_connect_and_helo_give_no_reply_when_negotiated_so(runtime: Runtime) -> None:
    s = Session(runtime)
    try:
        s.handle(mp.C_OPTNEG, optneg())
        assert s.handle(mp.C_CONNECT, connect4()) is None
        assert s.handle(mp.C_HELO, cstr("helo.example.net")) is None
    finally:
        s.close()


def test_every_stage_answers_when_the_mta_offers_no_reply_step(session: Session) -> None:
    replies(session.handle(mp.C_OPTNEG, optneg(protocol=0)))
    for command, data in [(mp.C_CONNECT, connect4()), (mp.C_HELO, cstr("helo.example.net")),
                          (mp.C_MAIL, cstr("<a@sender.example>")),
                          (mp.C_RCPT, cstr("<bob@ours.example>")), (mp.C_DATA, b""),
                          (mp.C_HEADER, header("Subject", "hi")), (mp.C_EOH, b""),
                          (mp.C_BODY, b"hello\r\n"), (mp.C_UNKNOWN, cstr("XYZZY"))]:
        assert replies(session.handle(command, data)) == [("c", b"")], chr(command)
    # the macro command never gets a reply
    assert session.handle(mp.C_MACRO, macros("E", i="Q1")) is None


def test_reject_at_rcpt_is_a_replycode_with_the_escaped_text() -> None:
    s = Session(build_runtime(parse(PERCENT_CONFIG)))
    try:
        start(s)
        s.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
        assert replies(s.handle(mp.C_RCPT, cstr("<carol@elsewhere.example>"))) == [
            ("y", b"554 5.7.1 100%% not a relay\0")]
        assert replies(s.handle(mp.C_RCPT, cstr("<bob@ours.example>"))) == [("c", b"")]
        assert s.txn.rcpts == ["bob@ours.example"]  # the refused one is dropped
    finally:
        s.close()


def test_reply_text_from_the_envelope_is_escaped_and_single_line(session: Session) -> None:
    start(session)
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    [(command, data)] = replies(session.handle(
        mp.C_RCPT, cstr("<fred%relay\r\n250 2.0.0 Ok\r\n@elsewhere.example>")))
    assert command == "y"
    assert b"\r" not in data and b"\n" not in data
    assert data == b"554 5.7.1 <fred%%relay??250 2.0.0 Ok??@elsewhere.example>: " \
                   b"Relay access denied\0"


# == Session: end of message =====================================================================
FORGED = (
    (AR, f" {AUTHSERV.upper()}; spf=pass smtp.mailfrom=x@y.example"),  # forged: ours, 1st
    (AR, " other.example; spf=fail"),  # someone else's: kept
    ("Subject", " hi"),
    (AR, f" (comment) {AUTHSERV}; dkim=pass"),  # forged: ours, 3rd
)


def test_eom_deletes_forged_results_then_inserts_ours_at_the_top(reporting: Session) -> None:
    start(reporting)
    edits = send_message(reporting, headers=FORGED)
    # deletions first, from the last, so that the indexes stay right and ours (inserted at
    # the top, where it would become Authentication-Results number 1) is never deleted
    assert edits[:2] == [("m", struct.pack(">I", 3) + cstr(AR) + b"\0"),
                         ("m", struct.pack(">I", 1) + cstr(AR) + b"\0")]
    assert edits[2][0] == "i"
    assert index_edit(edits[2][1]) == (0, AR, f" {AUTHSERV}; dkim=none")
    assert edits[3:] == [("c", b"")]


def test_eom_without_reported_results_deletes_forged_ones_and_adds_nothing(
        session: Session) -> None:
    """Only a relay rule ran (its result is not for Authentication-Results): the forged
    fields go, and no empty "authserv-id; none" field is added."""
    start(session)
    edits = send_message(session, headers=FORGED)
    assert [command for command, _ in edits] == ["m", "m", "c"]


def test_eom_without_leading_space_step(reporting: Session) -> None:
    start(reporting, protocol=ALL_STEPS & ~mp.P_HDR_LEADSPC)
    edits = send_message(reporting, headers=((AR, f"{AUTHSERV}; spf=pass"),))
    assert [command for command, _ in edits] == ["m", "i", "c"]
    assert index_edit(edits[0][1]) == (1, AR, "")
    assert index_edit(edits[1][1]) == (0, AR, f"{AUTHSERV}; dkim=none")


def test_eom_without_change_header_action_still_adds_ours(reporting: Session,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    start(reporting, actions=mp.F_ADDHDRS)
    with caplog.at_level(logging.WARNING, "mailwarden.milter"):
        edits = send_message(reporting, headers=FORGED)
    assert [command for command, _ in edits] == ["i", "c"]
    assert "does not let milters delete forged headers" in caplog.text


def test_eom_without_any_header_action_only_continues(session: Session) -> None:
    start(session, actions=0)
    assert send_message(session, headers=FORGED) == [("c", b"")]


# == Session: macros per message and per connection =============================================
def test_queue_id_comes_from_each_message_macros(session: Session,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    start(session)
    with caplog.at_level(logging.INFO, "mailwarden.milter"):
        send_message(session, queue_id="Q1")
        assert session.txn.queue_id == "Q1"
        send_message(session, queue_id="Q2")
        assert session.txn.queue_id == "Q2"
    eom_lines = [r.getMessage() for r in caplog.records if "stage=eom" in r.getMessage()]
    assert [line.split()[0] for line in eom_lines] == ["queue_id=Q1", "queue_id=Q2"]


def test_abort_forgets_the_message_macros(session: Session) -> None:
    start(session)
    session.handle(mp.C_MACRO, macros("M", i="Q1", **{"{auth_authen}": "alice"}))
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    assert session.txn.queue_id == "Q1"
    assert session.handle(mp.C_ABORT, b"") is None
    assert not session.connection.in_message
    assert session.handle(mp.C_MAIL, cstr("<alice@sender.example>")) is None
    assert session._symval("i") is None


@pytest.mark.parametrize(("abort", "second_mail_macros"), [
    (False, None),  # no SMFIC_MACRO before the second MAIL at all
    (False, {"{mail_addr}": "alice@sender.example"}),  # Postfix: `i` not known yet at MAIL
    (True, None),  # the first message was aborted (RSET) after its MAIL
], ids=["no-mail-macros", "mail-macros-without-i", "after-abort"])
def test_queue_id_does_not_leak_into_the_next_message(
        session: Session, caplog: pytest.LogCaptureFixture, abort: bool,
        second_mail_macros: dict[str, str] | None) -> None:
    start(session)
    if abort:
        session.handle(mp.C_MACRO, macros("M", i="Q1"))
        session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
        session.handle(mp.C_ABORT, b"")
    else:
        send_message(session, queue_id="Q1")
    if second_mail_macros is not None:
        session.handle(mp.C_MACRO, macros("M", **second_mail_macros))
    session.handle(mp.C_MAIL, cstr("<mallory@sender.example>"))
    with caplog.at_level(logging.INFO, "mailwarden.milter"):
        session.handle(mp.C_RCPT, cstr("<carol@elsewhere.example>"))  # refused: logged
    [line] = [r.getMessage() for r in caplog.records if "stage=rcpt" in r.getMessage()]
    assert "queue_id=Q1" not in line  # would point at another message in the mail log
    assert session.txn.queue_id == ""


def test_quit_nc_forgets_the_connection(session: Session, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    start(session)
    session.handle(mp.C_MACRO, macros("M", i="Q1", **{"{auth_authen}": "alice"}))
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    # authenticated: may relay
    assert replies(session.handle(mp.C_RCPT, cstr("<c@elsewhere.example>"))) == [("c", b"")]
    active = ACTIVE.value
    with caplog.at_level(logging.WARNING, "mailwarden.milter"):
        assert session.handle(mp.C_QUIT_NC, b"") is None  # mid-message
    assert "queue_id=Q1" in caplog.text
    assert "connection closed in the middle of a message" in caplog.text
    assert ACTIVE.value == active  # the MTA connection itself goes on
    assert not session.connection.in_message
    # the next SMTP session on the same milter connection: another client, no AUTH
    assert session.handle(mp.C_CONNECT, connect4("198.51.100.9", "other.example.net")) is None
    assert session.txn.client == "other.example.net[198.51.100.9]"
    session.handle(mp.C_HELO, cstr("other.example.net"))
    session.handle(mp.C_MAIL, cstr("<x@sender.example>"))
    assert session.txn.macros == {}
    assert session.txn.queue_id == ""
    assert not session.txn.authenticated
    [(command, _)] = replies(session.handle(mp.C_RCPT, cstr("<c@elsewhere.example>")))
    assert command == "y"  # relay denied: the first client's AUTH is gone
    # negotiation is per milter connection and stays: MAIL still has no reply
    assert session.handle(mp.C_MAIL, cstr("<x@sender.example>")) is None


IPREV_CONFIG = f"""\
authserv_id: {AUTHSERV}
rules:
  connect:
    - name: iprev
      check: iprev
      on: {{fail: reject}}
"""
IPREV_ZONE: dict[str, Any] = {
    "1.2.0.192.in-addr.arpa": {"PTR": ["good.example.net"]},
    "good.example.net": {"A": ["192.0.2.1"]},
    "2.2.0.192.in-addr.arpa": {"PTR": ["liar.example.net"]},
    "liar.example.net": {"A": ["203.0.113.9"]},
}


def test_quit_nc_drops_a_refusal_pending_from_connect() -> None:
    config = parse(IPREV_CONFIG)
    s = Session(Runtime.build(config, Engine(config, FakeDNS(IPREV_ZONE))))
    try:
        [(_, data)] = replies(s.handle(mp.C_OPTNEG, optneg()))
        assert struct.unpack_from(">III", data)[2] & mp.P_NR_HELO == 0  # HELO answers
        assert s.handle(mp.C_CONNECT, connect4("192.0.2.2", "liar.example.net")) is None
        [(command, data)] = replies(s.handle(mp.C_HELO, cstr("liar.example.net")))
        assert (command, data[:10]) == ("y", b"550 5.7.25")  # given at HELO (see stage.Plan)
        # the same refusal again, but the MTA ends that session before HELO
        s.handle(mp.C_CONNECT, connect4("192.0.2.2", "liar.example.net"))
        assert s.connection.pending is not None
        assert s.handle(mp.C_QUIT_NC, b"") is None
        assert s.connection.pending is None
        s.handle(mp.C_CONNECT, connect4("192.0.2.1", "good.example.net"))
        assert replies(s.handle(mp.C_HELO, cstr("good.example.net"))) == [("c", b"")]
    finally:
        s.close()


def test_quit_raises_eof(session: Session) -> None:
    start(session)
    with pytest.raises(EOFError):
        session.handle(mp.C_QUIT, b"")


@pytest.mark.parametrize("command", [0, ord("Z"), ord("a"), ord("c"), 0xFF])
def test_an_unknown_command_is_a_protocol_error(session: Session, command: int) -> None:
    start(session)
    with pytest.raises(mp.ProtocolError, match="unknown command"):
        session.handle(command, b"")


@pytest.mark.parametrize(("command", "data"), [
    (mp.C_MACRO, b""), (mp.C_HEADER, b"Subject: x"), (mp.C_CONNECT, b"no family"),
])
def test_broken_command_data_is_a_protocol_error(session: Session, command: int,
                                                 data: bytes) -> None:
    start(session)
    with pytest.raises(mp.ProtocolError):
        session.handle(command, data)


# == Session: failures inside the checks =========================================================
class Boom(RuntimeError):
    pass


def one_shot_failure(session: Session, monkeypatch: pytest.MonkeyPatch, method: str,
                     stage: str | None = None) -> list[bool]:
    """Make `session.connection.engine.<method>` raise once (for `stage` only, if given)."""
    original = getattr(session.connection.engine, method)
    fired: list[bool] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        if not fired and (stage is None or args[0] == stage):
            fired.append(True)
            raise Boom("a check blew up")
        return original(*args, **kwargs)

    monkeypatch.setattr(session.connection.engine, method, failing)
    return fired


@pytest.mark.parametrize(("stage", "method"), [
    ("mail", "run_stage"), ("rcpt", "run_stage"), ("eom", "end_of_message"),
])
def test_an_exception_in_a_check_is_a_451_and_the_session_goes_on(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        stage: str, method: str) -> None:
    # MAIL must answer for its failure to be told: the MTA offers no NR_MAIL here
    s = Session(runtime)
    try:
        start(s, protocol=ALL_STEPS & ~mp.P_NR_MAIL)
        fired = one_shot_failure(s, monkeypatch, method, stage if method == "run_stage" else None)
        with caplog.at_level(logging.ERROR, "mailwarden.milter"):
            mail = s.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
            if stage == "mail":
                assert replies(mail) == [INTERNAL_ERROR]
                assert not s.connection.in_message
            else:
                assert replies(mail) == [("c", b"")]
                rcpt = replies(s.handle(mp.C_RCPT, cstr("<bob@ours.example>")))
                if stage == "rcpt":
                    assert rcpt == [INTERNAL_ERROR]
                    # the message goes on with its other recipients
                    assert replies(s.handle(mp.C_RCPT, cstr("<dan@ours.example>"))) == [
                        ("c", b"")]
                else:
                    assert rcpt == [("c", b"")]
                eom = replies(s.handle(mp.C_EOB, b""))
                if stage == "eom":
                    assert eom == [INTERNAL_ERROR]
                    assert not s.connection.in_message
                else:
                    assert eom[-1] == ("c", b"")
        assert fired == [True]
        assert f"internal error at {stage}" in caplog.text
        assert "Boom: a check blew up" in caplog.text  # with its traceback
        # the next message on the same connection is served normally
        assert replies(s.handle(mp.C_MAIL, cstr("<alice@sender.example>"))) == [("c", b"")]
        assert replies(s.handle(mp.C_RCPT, cstr("<bob@ours.example>"))) == [("c", b"")]
        edits = replies(s.handle(mp.C_EOB, b""))
        assert [command for command, _ in edits] == ["c"]  # no result to report
    finally:
        s.close()


def test_an_exception_where_no_reply_is_due_answers_nothing(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    start(session)  # MAIL is no-reply: its failure cannot be told, the message goes on
    one_shot_failure(session, monkeypatch, "run_stage", "mail")
    assert session.handle(mp.C_MAIL, cstr("<alice@sender.example>")) is None
    assert replies(session.handle(mp.C_RCPT, cstr("<bob@ours.example>"))) == [("c", b"")]


def test_an_exception_at_a_stage_that_cannot_refuse_continues(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    replies(session.handle(mp.C_OPTNEG, optneg(protocol=0)))  # every stage answers
    session.handle(mp.C_CONNECT, connect4())
    session.handle(mp.C_HELO, cstr("helo.example.net"))
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))

    def broken(data: bytes) -> tuple[str, str]:
        raise Boom("header parser bug")

    monkeypatch.setattr(mp, "parse_header", broken)
    assert replies(session.handle(mp.C_HEADER, header("Subject", "x"))) == [("c", b"")]
    monkeypatch.undo()
    assert replies(session.handle(mp.C_HEADER, header("Subject", "x"))) == [("c", b"")]


def test_a_recipient_tempfailed_by_an_internal_error_is_not_kept(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    start(session)
    one_shot_failure(session, monkeypatch, "run_stage", "rcpt")
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    assert replies(session.handle(mp.C_RCPT, cstr("<boom@ours.example>"))) == [INTERNAL_ERROR]
    assert replies(session.handle(mp.C_RCPT, cstr("<bob@ours.example>"))) == [("c", b"")]
    assert session.txn.rcpts == ["bob@ours.example"]


# == Session: the connection count =============================================================
def test_close_counts_down_exactly_once(runtime: Runtime) -> None:
    before = ACTIVE.value
    s = Session(runtime)
    other = Session(runtime)
    assert ACTIVE.value == before + 2
    s.close()
    assert ACTIVE.value == before + 1
    s.close()  # the server's finally: and an explicit close
    assert ACTIVE.value == before + 1
    other.close()
    assert ACTIVE.value == before


def test_close_mid_message_logs_the_message_and_frees_the_body(
        runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    before = ACTIVE.value
    s = Session(runtime)
    start(s)
    s.handle(mp.C_MACRO, macros("M", i="HALF1"))
    s.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    s.handle(mp.C_BODY, b"x" * 1000)
    body = s.txn.body
    assert body is not None
    with caplog.at_level(logging.WARNING, "mailwarden.milter"):
        s.close()
        s.close()
    assert ACTIVE.value == before
    assert body.closed
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "queue_id=HALF1" in lines[0]
    assert "connection closed in the middle of a message" in lines[0]


def test_load_board_lets_the_least_loaded_workers_take_connections() -> None:
    from mailwarden.server import LoadBoard

    board = LoadBoard(3)
    assert all(board.get(slot) == -1 for slot in range(3))  # no worker yet
    board.set(0, 4)
    board.set(1, 3)
    assert board.least_loaded(1) and board.least_loaded(0)  # within one of each other
    assert not board.least_loaded(0, slack=0)
    board.set(2, 2)
    assert not board.least_loaded(0)  # 4 against 2: leave it to worker 2
    assert board.least_loaded(2)
    board.set(2, -1)  # worker 2 died: its slot no longer counts
    assert board.least_loaded(0)


# == Session: the command order and the negotiated limits (libmilter's engine) ===================
BODY_CONFIG = CONFIG + "  eom:\n    - name: dkim\n      check: dkim_verify\n"


def test_commands_before_the_option_negotiation_are_a_protocol_error(session: Session) -> None:
    with pytest.raises(mp.ProtocolError, match="before option negotiation"):
        session.handle(mp.C_CONNECT, connect4())


def test_a_second_option_negotiation_is_a_protocol_error(session: Session) -> None:
    start(session)
    with pytest.raises(mp.ProtocolError, match="option negotiation again"):
        session.handle(mp.C_OPTNEG, optneg())
    # QUIT_NC starts another SMTP session on the same negotiation: CONNECT comes next
    other = Session(session.runtime)
    try:
        start(other)
        assert other.handle(mp.C_QUIT_NC, b"") is None
        assert other.handle(mp.C_CONNECT, connect4()) is None  # no reply negotiated
    finally:
        other.close()


@pytest.mark.parametrize("command", [mp.C_EOB, mp.C_HEADER, mp.C_RCPT, mp.C_BODY])
def test_message_commands_without_mail_are_a_protocol_error(session: Session,
                                                             command: int) -> None:
    start(session)
    data = header("Subject", "x") if command == mp.C_HEADER else cstr("<b@ours.example>")
    with pytest.raises(mp.ProtocolError, match="outside a message"):
        session.handle(command, b"" if command == mp.C_EOB else data)


def test_a_message_ended_by_its_end_or_abort_takes_no_more_message_commands(
        session: Session) -> None:
    start(session)
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    session.handle(mp.C_RCPT, cstr("<bob@ours.example>"))
    replies(session.handle(mp.C_EOB, b""))
    with pytest.raises(mp.ProtocolError, match="outside a message"):
        session.handle(mp.C_HEADER, header("Subject", "late"))
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    assert session.handle(mp.C_ABORT, b"") is None
    with pytest.raises(mp.ProtocolError, match="outside a message"):
        session.handle(mp.C_EOB, b"")


def test_a_protocol_version_older_than_2_is_refused(session: Session) -> None:
    with pytest.raises(mp.ProtocolError, match="version 1 is older than 2"):
        session.handle(mp.C_OPTNEG, optneg(version=1))


def test_body_chunks_are_limited_to_what_was_negotiated() -> None:
    runtime = build_runtime(parse(BODY_CONFIG))
    for offered, largest in ((0, mp.CHUNK_DEFAULT), (mp.P_MDS_256K, mp.CHUNK_256K),
                             (mp.P_MDS_256K | mp.P_MDS_1M, mp.CHUNK_1M)):
        s = Session(runtime)
        try:
            [(_, data)] = replies(s.handle(mp.C_OPTNEG, optneg(protocol=ALL_STEPS | offered)))
            taken = struct.unpack_from(">III", data)[2]
            assert taken & (mp.P_MDS_256K | mp.P_MDS_1M) == (offered & mp.P_MDS_1M or offered)
            s.handle(mp.C_CONNECT, connect4())
            s.handle(mp.C_HELO, cstr("helo.example.net"))
            s.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
            s.handle(mp.C_RCPT, cstr("<bob@ours.example>"))
            assert s.handle(mp.C_BODY, b"x" * largest) is None  # no reply for the body
            with pytest.raises(mp.ProtocolError, match=f"more than the {largest} negotiated"):
                s.handle(mp.C_BODY, b"x" * (largest + 1))
        finally:
            s.close()


def test_an_mta_without_leading_space_headers_is_warned_about(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "mailwarden.milter"):
        session.handle(mp.C_OPTNEG, optneg(protocol=ALL_STEPS & ~mp.P_HDR_LEADSPC))
    assert "SMFIP_HDR_LEADSPC" in caplog.text
    caplog.clear()
    other = Session(session.runtime)
    try:
        with caplog.at_level(logging.WARNING, "mailwarden.milter"):
            other.handle(mp.C_OPTNEG, optneg())
        assert "SMFIP_HDR_LEADSPC" not in caplog.text
    finally:
        other.close()
