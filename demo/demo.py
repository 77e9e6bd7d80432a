#!/usr/bin/env python3
"""mailwarden, end to end, in one command (`make demo`).

Brings up, all on loopback and all private to a temporary directory:

* a DNS server (`python -m mailwarden.devtools.devdns`) serving demo/zone.yaml plus the DKIM and ARC
  public keys generated for this run;
* the mailwarden daemon (`python -m mailwarden run`) with demo/mailwarden.yaml: SPF, relay
  checks, DKIM verification and signing, ARC, DMARC with a trusted ARC sealer;
* a real Postfix (the test harness tests/integration/postfix.py) with mailwarden as its milter,
  relaying whatever it accepts to a local SMTP sink.

Then it sends a handful of messages from different 127.0.0.x addresses, prints each SMTP
outcome and the headers as delivered, stops everything it started, and exits 0 only when every
outcome was the expected one. Needs root (Postfix) and Debian's postfix package.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import dkim
import yaml

from mailwarden.devtools.devdns import load_zone_file
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private
from mailwarden.dkim.sign import SignOptions, sign_message
from mailwarden.dkim.verify import verify_message
from mailwarden.dns import Nameserver, Resolver

DEMO_DIR = Path(__file__).resolve().parent
REPO = DEMO_DIR.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the Postfix and daemon harnesses

from daemon import Daemon  # noqa: E402
from postfix import PostfixInstance, postfix_available  # noqa: E402

AUTHSERV_ID = "mx.ours.example"
SETUP_HINT = "run: bash scripts/setup.sh --test"
DELIVERY_TIMEOUT = 20.0
SHOWN_HEADERS = ("received-spf", "authentication-results", "arc-seal", "arc-message-signature",
                 "arc-authentication-results", "dkim-signature", "from", "subject")
# (domain, selector) of every key the demo generates; all are published in the zone
KEYS = {"bank": ("bank.example", "mail2026"), "club": ("club.example", "s1"),
        "lists": ("lists.example", "arc2026"), "ours": ("ours.example", "demo2026")}


class DemoError(RuntimeError):
    """The demo cannot run here (not root, Postfix missing) or a component did not start."""


@dataclass
class Outcome:
    """What happened to one message."""

    name: str
    title: str
    stage: str  # the SMTP command whose reply decided: MAIL FROM, RCPT TO or DATA
    code: int
    reply: str  # e.g. "250 2.0.0 Ok: queued as 4Xb9..." or "550 5.7.1 ..."
    delivered: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)  # as delivered, unfolded
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def header(self, name: str) -> list[str]:
        """Every value of header field `name` in the delivered message, top first."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def our_results(self) -> str:
        """Our Authentication-Results (authserv-id mx.ours.example), or ""."""
        return next((v for v in self.header("Authentication-Results")
                     if v.split(";", 1)[0].strip().lower() == AUTHSERV_ID), "")


@dataclass(frozen=True)
class Scenario:
    """One message to send, and what must come of it."""

    name: str
    title: str
    source: str  # client address, 127.0.0.x
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    build: Callable[[World], bytes]
    expect_code: int
    expect_reply: tuple[str, ...] = ()  # substrings of the final reply
    expect_results: tuple[str, ...] = ()  # substrings of our Authentication-Results
    expect_headers: tuple[str, ...] = ()  # header field names that must be delivered


@dataclass
class World:
    """Keys and DNS of this run, for building messages."""

    keys: dict[str, SigningKey]
    resolver: Resolver
    tag: str  # unique per run, in every Message-ID


# ---------------------------------------------------------------------------------- messages


def _message(world: World, name: str, headers: list[tuple[str, str]], body: str) -> bytes:
    """A message with Date and a unique Message-ID, CRLF line ends."""
    fields = [*headers, ("Date", email.utils.formatdate()),
              ("Message-ID", f"<{name}.{world.tag}@demo.example>")]
    head = "".join(f"{key}: {value}\r\n" for key, value in fields)
    return (head + "\r\n" + body.replace("\n", "\r\n")).encode()


def _signed(data: bytes, key: SigningKey) -> bytes:
    """`data` with a DKIM-Signature of `key` on top."""
    fields = sign_message(data, [key], SignOptions())
    return "".join(f"{n}:{v}".replace("\n", "\r\n") + "\r\n" for n, v in fields).encode() + data


def legit_message(world: World) -> bytes:
    data = _message(world, "legit", [
        ("From", "Bank of Example <statements@bank.example>"), ("To", "<bob@ours.example>"),
        ("Subject", "Your November statement")], "Your statement is ready.\n")
    return _signed(data, world.keys["bank"])


def spoof_message(world: World) -> bytes:
    return _message(world, "spoof", [
        ("From", "Bank of Example Security <security@bank.example>"),
        ("To", "<bob@ours.example>"), ("Subject", "Urgent: confirm your password")],
        "Click here within 24 hours or your account is closed.\n")


def relay_message(world: World) -> bytes:
    return _message(world, "relay", [
        ("From", "<offers@bulk.example>"), ("To", "<victim@elsewhere.example>"),
        ("Subject", "Cheap watches")], "Buy now.\n")


def impersonation_message(world: World) -> bytes:
    return _message(world, "impersonation", [
        ("From", "CEO <ceo@ours.example>"), ("To", "<bob@ours.example>"),
        ("Subject", "Wire transfer today")], "Please pay the attached invoice.\n")


def mailing_list_message(world: World) -> bytes:
    """Carol's club.example mail, DKIM-signed, as the list lists.example forwards it: Subject
    tagged and a footer added (Carol's signature breaks), the list's own view of the original
    in its Authentication-Results, and an ARC set (i=1) sealed by lists.example."""
    original = _signed(_message(world, "arc", [
        ("From", "Carol <carol@club.example>"), ("To", "Picnic list <picnic@lists.example>"),
        ("Subject", "Picnic on Saturday")], "Bring a blanket.\n"), world.keys["club"])
    checked = verify_message(original, world.resolver)
    dkim_result = checked[0].result if checked else "none"
    forwarded = original.replace(b"Subject: Picnic", b"Subject: [picnic] Picnic")
    forwarded += b"--\r\nPicnic list - https://lists.example/picnic\r\n"
    forwarded = (
        b"Authentication-Results: lists.example; spf=pass smtp.mailfrom=carol@club.example; "
        b"dkim=" + dkim_result.encode() + b" header.d=club.example; "
        b"dmarc=pass header.from=club.example\r\n"
        b"List-Id: Picnic <picnic.lists.example>\r\n" + forwarded
    )
    key = world.keys["lists"]
    arc_set = dkim.arc_sign(forwarded, key.selector.encode(), key.domain.encode(), key.private,
                            b"lists.example")
    if not arc_set:
        raise DemoError("dkimpy made no ARC set for the mailing-list message")
    return b"".join(arc_set) + forwarded


def outgoing_message(world: World) -> bytes:
    return _message(world, "outgoing", [
        ("From", "Alice <alice@ours.example>"), ("To", "<partner@elsewhere.example>"),
        ("Subject", "Meeting notes")], "Notes attached.\n")


SCENARIOS = (
    Scenario(
        "legit", "A legitimate message: bank.example's own server, DKIM-signed (p=reject)",
        "127.0.0.2", "mail.bank.example", "statements@bank.example", ("bob@ours.example",),
        legit_message, 250,
        expect_results=("spf=pass smtp.mailfrom=statements@bank.example", "dkim=pass",
                        "header.d=bank.example", "dmarc=pass", "header.from=bank.example"),
        expect_headers=("Received-SPF", "DKIM-Signature")),
    Scenario(
        "spoof", "A spoofed From: bank.example, sent by a bulk mailer with its own SPF",
        "127.0.0.66", "mta.bulk.example", "bounce@bulk.example", ("bob@ours.example",),
        spoof_message, 550, expect_reply=("5.7.1", "bank.example")),
    Scenario(
        "relay", "A relay attempt: an outsider sends to a domain that is not ours",
        "127.0.0.66", "mta.bulk.example", "offers@bulk.example", ("victim@elsewhere.example",),
        relay_message, 554, expect_reply=("5.7.1", "Relay access denied")),
    Scenario(
        "impersonation", "An outsider using our own domain in MAIL FROM",
        "127.0.0.66", "mta.bulk.example", "ceo@ours.example", ("bob@ours.example",),
        impersonation_message, 554, expect_reply=("5.7.1",)),
    Scenario(
        "arc", "Through a mailing list: DKIM broken and SPF unaligned, ARC from a trusted sealer",
        "127.0.0.30", "mail.lists.example", "picnic-bounces@lists.example", ("bob@ours.example",),
        mailing_list_message, 250,
        expect_results=("spf=pass smtp.mailfrom=picnic-bounces@lists.example", "dkim=fail",
                        "header.d=club.example", "arc=pass", "arc.chain=lists.example",
                        "dmarc=fail", "override=local_policy", "header.from=club.example"),
        expect_headers=("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")),
    Scenario(
        "outgoing", "Outgoing mail from our submission host: mailwarden signs it",
        "127.0.0.10", "submit.ours.example", "alice@ours.example",
        ("partner@elsewhere.example",), outgoing_message, 250,
        expect_headers=("DKIM-Signature",)),
)


# ---------------------------------------------------------------------------------- plumbing


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return ("the demo runs a private Postfix, which needs root: run it as root "
                f"(and if Postfix is not installed yet, {SETUP_HINT})")
    if not postfix_available() or shutil.which("postfix", path="/usr/sbin:/sbin") is None:
        return f"Postfix is not installed: {SETUP_HINT}"
    return None


def make_key(workdir: Path, domain: str, selector: str) -> SigningKey:
    path = workdir / f"{domain}.{selector}.pem"
    write_private(generate("rsa", 2048), str(path))
    return load_key(domain, selector, str(path))


def start_dns(zone: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[str], int]:
    """mailwarden.devtools.devdns serving `zone` on a free port of 127.0.0.1; the process and
    port."""
    path = workdir / "zone.yaml"
    path.write_text(yaml.safe_dump(zone, sort_keys=False))
    process = subprocess.Popen(
        [sys.executable, "-m", "mailwarden.devtools.devdns", str(path), "--host", "127.0.0.1",
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        stop_process(process)
        raise DemoError(f"the DNS server did not start: {line.strip()!r}")
    return process, int(line.rsplit(":", 1)[1])


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 5 s; by PID, via Popen."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if process.stdout is not None:
        process.stdout.close()


def daemon_config(socket_path: Path, dns_port: int, key: SigningKey) -> dict[str, Any]:
    """demo/mailwarden.yaml with this run's socket, DNS port and signing key."""
    config: dict[str, Any] = yaml.safe_load((DEMO_DIR / "mailwarden.yaml").read_text())
    config["listen"] = f"unix:{socket_path}"
    config["dns"]["nameservers"] = [f"127.0.0.1:{dns_port}"]
    config["signing"]["keys"] = [{"domain": key.domain, "selector": key.selector,
                                  "key": key.path}]
    return config


def smtp_send(port: int, scenario: Scenario, data: bytes) -> tuple[str, int, str]:
    """One SMTP session from scenario.source: (deciding command, code, reply text)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(scenario.source, 0),
                      timeout=60) as smtp:
        smtp.ehlo(scenario.helo)
        code, text = smtp.mail(scenario.mail_from)
        if code != 250:
            return "MAIL FROM", code, text.decode(errors="replace")
        refused: tuple[int, bytes] | None = None
        accepted = 0
        for rcpt in scenario.rcpts:
            code, text = smtp.rcpt(rcpt)
            if code in (250, 251):
                accepted += 1
            else:
                refused = (code, text)
        if not accepted and refused is not None:
            smtp.rset()
            return "RCPT TO", refused[0], refused[1].decode(errors="replace")
        code, text = smtp.data(data)
        return "DATA", code, text.decode(errors="replace")


def parse_headers(raw: bytes) -> list[tuple[str, str]]:
    """The header fields of `raw`, unfolded, in order."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return fields


def wait_delivery(postfix: PostfixInstance, message_id: bytes, timeout: float) -> bytes | None:
    """The delivered message carrying `message_id`, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in postfix.messages():
            if message_id in raw.split(b"\r\n\r\n", 1)[0]:
                return raw
        time.sleep(0.05)
    return None


def judge(scenario: Scenario, outcome: Outcome) -> None:
    """Record in outcome.problems every way it differs from what the scenario expects."""
    if outcome.code != scenario.expect_code:
        outcome.problems.append(f"expected SMTP {scenario.expect_code}, got {outcome.reply}")
    outcome.problems += [f"reply lacks {want!r}" for want in scenario.expect_reply
                         if want not in outcome.reply]
    if scenario.expect_code != 250:
        return
    if not outcome.delivered:
        outcome.problems.append(f"not delivered within {DELIVERY_TIMEOUT:.0f} s")
        return
    results = outcome.our_results()
    if scenario.expect_results and not results:
        outcome.problems.append(f"no Authentication-Results from {AUTHSERV_ID}")
    outcome.problems += [f"Authentication-Results lacks {want!r}"
                         for want in scenario.expect_results if results and want not in results]
    outcome.problems += [f"no {name} header delivered" for name in scenario.expect_headers
                         if not outcome.header(name)]


def shorten(value: str) -> str:
    """Cut long base64 (b=, bh=, p=) so a signature fits the screen."""
    return re.sub(r"\b(b|bh)=([A-Za-z0-9+/]{12})[A-Za-z0-9+/= ]*[A-Za-z0-9+/=]",
                  r"\1=\2...", value)


def report(out: TextIO, index: int, scenario: Scenario, outcome: Outcome) -> None:
    """Print one outcome."""
    say = out.write
    say(f"\n[{index}/{len(SCENARIOS)}] {scenario.title}\n")
    say(f"  client {scenario.source} (HELO {scenario.helo})  MAIL FROM:<{scenario.mail_from}>  "
        f"RCPT TO:{', '.join(f'<{r}>' for r in scenario.rcpts)}\n")
    say(f"  SMTP ({outcome.stage}): {outcome.reply}\n")
    if outcome.delivered:
        say("  delivered with these headers (signature data shortened):\n")
        for name, value in outcome.headers:
            if name.lower() in SHOWN_HEADERS:
                text = textwrap.fill(f"{name}: {shorten(value)}", width=100,
                                     initial_indent="    ", subsequent_indent="        ",
                                     break_long_words=False, break_on_hyphens=False)
                say(text + "\n")
    for note in outcome.notes:
        say(f"  {note}\n")
    verdict = "as expected" if outcome.ok else "UNEXPECTED: " + "; ".join(outcome.problems)
    say(f"  => {verdict}\n")
    out.flush()


# ---------------------------------------------------------------------------------- the demo


def run_demo(out: TextIO = sys.stdout, keep: bool = False) -> list[Outcome]:
    """Bring everything up, send every scenario, print and return the outcomes, and stop
    everything again. Raises DemoError when the demo cannot run here."""
    problem = preflight()
    if problem:
        raise DemoError(problem)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mailwarden-demo-"))
    dns_process: subprocess.Popen[str] | None = None
    daemon: Daemon | None = None
    postfix: PostfixInstance | None = None
    outcomes: list[Outcome] = []
    try:
        keydir = workdir / "keys"
        keydir.mkdir(mode=0o700)
        keys = {name: make_key(keydir, *where) for name, where in KEYS.items()}
        zone = load_zone_file(DEMO_DIR / "zone.yaml")
        for key in keys.values():
            zone[key.dns_name] = [{"TXT": key.public_record}]
        dns_process, dns_port = start_dns(zone, workdir)
        resolver = Resolver(nameservers=[Nameserver("127.0.0.1", dns_port)], timeout=0.5,
                            lifetime=2.0)

        # smtpd (user postfix) must reach the milter socket: put it in the harness's socket_dir
        postfix = PostfixInstance(workdir / "postfix", milter=None,
                                  extra_main_cf={"myhostname": AUTHSERV_ID,
                                                 "mydomain": "ours.example"})
        socket_path = postfix.socket_dir / "mailwarden.sock"
        postfix.milter = f"unix:{socket_path}"
        daemon = Daemon(workdir / "mailwarden", daemon_config(socket_path, dns_port,
                                                               keys["ours"]))
        try:
            daemon.start()
        except AssertionError as exc:
            raise DemoError(str(exc)) from None
        postfix.start()
        out.write(f"mailwarden demo (work directory {workdir})\n"
                  f"  DNS:        mailwarden.devtools.devdns on 127.0.0.1:{dns_port} "
                  f"(demo/zone.yaml "
                  f"+ {len(keys)} generated DKIM/ARC keys)\n"
                  f"  mailwarden: pid {daemon.process.pid if daemon.process else '?'}, "
                  f"{daemon.socket} (demo/mailwarden.yaml)\n"
                  f"  Postfix:    master pid {postfix.master_pid}, smtpd on "
                  f"127.0.0.1:{postfix.smtp_port}, relaying to a sink on "
                  f"127.0.0.1:{postfix.sink_port}\n")
        out.flush()

        world = World(keys, resolver, uuid.uuid4().hex[:12])
        for index, scenario in enumerate(SCENARIOS, 1):
            data = scenario.build(world)
            stage, code, text = smtp_send(postfix.smtp_port, scenario, data)
            outcome = Outcome(scenario.name, scenario.title, stage, code, f"{code} {text}")
            if code == 250:
                message_id = f"<{scenario.name}.{world.tag}@demo.example>".encode()
                raw = wait_delivery(postfix, message_id, DELIVERY_TIMEOUT)
                if raw is not None:
                    outcome.delivered = True
                    outcome.headers = parse_headers(raw)
                    if scenario.name == "outgoing":
                        checked = verify_message(raw, resolver)
                        verdicts = ", ".join(f"d={r.domain} {r.result}" for r in checked)
                        outcome.notes.append("the delivered DKIM-Signature, checked against "
                                             f"DNS: {verdicts or 'none'}")
                        if not any(r.result == "pass" and r.domain == "ours.example"
                                   for r in checked):
                            outcome.problems.append("mailwarden's signature does not verify")
            judge(scenario, outcome)
            outcomes.append(outcome)
            report(out, index, scenario, outcome)

        if not all(o.ok for o in outcomes):
            out.write("\n--- mailwarden log (tail):\n"
                      + "\n".join(daemon.log().splitlines()[-30:])
                      + f"\n--- Postfix maillog (tail):\n{postfix.maillog_tail(30)}\n")
    finally:
        for stop in (postfix.stop if postfix else None, daemon.stop if daemon else None,
                     (lambda: stop_process(dns_process)) if dns_process else None):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
        failed = any(not o.ok for o in outcomes)
        if keep or failed:
            out.write(f"\n(kept the work directory {workdir})\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    good = sum(o.ok for o in outcomes)
    out.write(f"\n{good} of {len(SCENARIOS)} messages had the expected outcome; everything "
              f"started was stopped ({time.monotonic() - started:.1f} s).\n")
    out.flush()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (keys, configs, logs, delivered mail)")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through run_demo's cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        outcomes = run_demo(sys.stdout, keep=args.keep)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    if len(outcomes) != len(SCENARIOS) or not all(o.ok for o in outcomes):
        print("demo: FAILED: some messages did not have the expected outcome", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
