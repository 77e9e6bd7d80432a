"""Self-test of the private-Postfix harness (tests/integration/postfix.py): a real Postfix on
loopback relays what it receives to the SMTP sink, two instances run side by side, and an
unreachable milter gets milter_default_action = tempfail."""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
from postfix import MYHOSTNAME, PostfixInstance, free_port, postfix_available, postfix_version

pytestmark = pytest.mark.skipif(
    not postfix_available(),
    reason="the postfix binary is absent (install Debian's 'postfix' package, "
    "debconf main_mailer_type 'No configuration')",
)

CLIENT = "127.0.0.5"


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    with PostfixInstance(tmp_path_factory.mktemp("postfix"), milter=None) as instance:
        yield instance


def send(port: int, subject: str, rcpts: list[str], sender: str = "alice@sender.example") -> None:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(rcpts)
    message["Subject"] = subject
    message.set_content(f"Body of {subject}.\n.A line that starts with a dot.\n")
    with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT, 0), timeout=30,
                      local_hostname="client.sender.example") as smtp:
        refused = smtp.send_message(message, from_addr=sender, to_addrs=rcpts)
    assert refused == {}


def by_subject(messages: list[bytes]) -> dict[str, EmailMessage]:
    parsed = [email.message_from_bytes(raw, policy=email.policy.default) for raw in messages]
    return {str(m["Subject"]): m for m in parsed if isinstance(m, EmailMessage)}


def test_relays_every_domain_to_the_sink(mx: PostfixInstance) -> None:
    before = len(mx.messages())
    tag = uuid.uuid4().hex[:8]
    send(mx.smtp_port, f"first {tag}", ["bob@one.example", "carol@two.example"])
    send(mx.smtp_port, f"second {tag}", ["dave@three.example"], sender="")
    messages = mx.wait_for_messages(before + 2, timeout=20)

    found = by_subject(messages[before:])
    assert set(found) == {f"first {tag}", f"second {tag}"}
    queue_ids = mx.queue_ids()
    for message in found.values():
        received = str(message["Received"])  # the topmost one: Postfix's
        assert f"(unknown [{CLIENT}])" in received, received
        assert f"by {MYHOSTNAME} (Postfix) with ESMTP id " in received, received
        assert received.split(" id ")[1].split()[0].rstrip(";") in queue_ids
        assert "A line that starts with a dot." in message.get_content()
    for raw in messages[before:]:
        assert raw.count(b"\r\n") == raw.count(b"\n"), "the sink keeps CRLF line ends"
        assert b"\n.A line that starts with a dot." in raw, "dot-unstuffed"

    envelopes = {d.data: d for d in mx.deliveries()}
    first = next(d for raw, d in envelopes.items() if f"first {tag}".encode() in raw)
    assert sorted(first.rcpt_tos) == ["bob@one.example", "carol@two.example"]
    assert first.mail_from == "alice@sender.example"
    second = next(d for raw, d in envelopes.items() if f"second {tag}".encode() in raw)
    assert second.mail_from == "" and second.rcpt_tos == ("dave@three.example",)
    assert "status=sent" in mx.maillog()


def test_configuration_is_private(mx: PostfixInstance) -> None:
    def postconf(*args: str) -> str:
        result = subprocess.run(["postconf", "-c", str(mx.config_dir), *args],
                                capture_output=True, text=True, check=True,
                                env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
        assert result.stderr == "", result.stderr  # e.g. "unused parameter" warnings
        return result.stdout

    assert postfix_version()
    settings = dict(line.split(" = ", 1) for line in postconf("-n").splitlines() if " = " in line)
    assert settings["queue_directory"] == str(mx.queue_dir)
    assert settings["data_directory"] == str(mx.data_dir)
    assert settings["smtpd_peername_lookup"] == "no"
    assert settings["milter_default_action"] == "tempfail"
    assert not Path(settings["data_directory"]).is_relative_to("/var/lib/postfix")
    services = [line.split() for line in postconf("-M").splitlines() if line.strip()]
    inet = [fields[0] for fields in services if fields[1] == "inet"]
    assert inet == [f"127.0.0.1:{mx.smtp_port}"]
    assert {fields[4] for fields in services} == {"n"}, "no service is chrooted"
    assert mx.is_running()


def test_two_instances_at_once(mx: PostfixInstance, tmp_path: Path) -> None:
    other = PostfixInstance(tmp_path / "other", milter=None)
    with other:
        assert other.smtp_port != mx.smtp_port and other.sink_port != mx.sink_port
        assert other.master_pid != mx.master_pid and other.is_running() and mx.is_running()
        tag = uuid.uuid4().hex[:8]
        before_mx, before_other = len(mx.messages()), len(other.messages())
        send(mx.smtp_port, f"to mx {tag}", ["one@a.example"])
        send(other.smtp_port, f"to other {tag}", ["two@b.example"])
        assert set(by_subject(mx.wait_for_messages(before_mx + 1, timeout=20))) >= {
            f"to mx {tag}"}
        assert set(by_subject(other.wait_for_messages(before_other + 1, timeout=20))) == {
            f"to other {tag}"}
        assert f"to other {tag}" not in by_subject(mx.messages())
    assert not other.is_running()
    other.stop()  # idempotent
    assert mx.is_running()


def test_unreachable_milter_tempfails(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    with PostfixInstance(tmp_path, milter=f"inet:127.0.0.1:{closed}") as mx, smtplib.SMTP(
        "127.0.0.1", mx.smtp_port, source_address=(CLIENT, 0), timeout=30
    ) as smtp:
        smtp.ehlo("client.sender.example")
        code, reply = smtp.mail("alice@sender.example")
        assert 400 <= code < 500, (code, reply)
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail("alice@sender.example", ["bob@one.example"], b"Subject: x\r\n\r\nx\r\n")
        log = mx.wait_for_log(rf"milter-reject: MAIL from unknown\[{CLIENT}\]: 451 ")
        assert log
        assert f"connect to Milter service inet:127.0.0.1:{closed}" in mx.maillog()
        assert mx.messages() == []


def test_socket_dir_takes_a_unix_milter_socket(tmp_path: Path) -> None:
    mx = PostfixInstance(tmp_path, milter=None)
    path = mx.socket_dir / "milter.sock"  # known before start(): build the spec from it
    mx.milter = f"unix:{path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        path.chmod(0o666)  # smtpd connects as the postfix user
        listener.listen()
        listener.settimeout(20)
        with mx, smtplib.SMTP(timeout=30) as smtp, ThreadPoolExecutor(1) as pool:
            # smtpd talks to the milter before it greets: connect in the background
            greeting = pool.submit(smtp.connect, "127.0.0.1", mx.smtp_port, (CLIENT, 0))
            connection, _ = listener.accept()  # smtpd reached the socket...
            connection.close()  # ...and finds no milter there: tempfail
            assert greeting.result(timeout=30)[0] == 220
            smtp.ehlo("client.sender.example")
            code, reply = smtp.mail("alice@sender.example")
            assert 400 <= code < 500, (code, reply)
        assert f"milter unix:{path}" in mx.maillog()
