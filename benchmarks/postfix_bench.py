"""End to end through a real Postfix: messages/s delivered, without a milter and with each stack.

    smtp-source (Postfix's test client, 20 sessions, one 4 KiB message per SMTP session)
      -> Postfix smtpd on loopback (tests/integration/postfix.py), the milters under test
      -> Postfix's queue manager and smtp client
      -> smtp-sink (Postfix's test server, counting with -c, storing nothing) on loopback

The cases run in turn, --rounds times (this 2-core machine's speed drifts by up to a third
between minutes, Postfix's ceiling included): each case's rate is its median, and each ratio is
the median of the ratios measured within one round. For each case, Postfix is started afresh
with that case's smtpd_milters (one instance directory for the run, its queue empty between
cases) and the milters are new:

  no milter                   the ceiling
  OpenDKIM signing            Debian's opendkim, RSA-2048 (tests/integration/opendkim.py)
  mailwarden signing          dkim_sign with the same RSA-2048 key
  OpenDKIM + OpenDMARC        the reference inbound stack: OpenDKIM verify, then OpenDMARC
                              (tests/integration/opendmarc.py) with SPF and its HistoryFile;
                              skipped, with the reason, where OpenDMARC cannot run
  mailwarden inbound          SPF (MAIL FROM and HELO), dkim_verify, DMARC with its store (the
                              aggregate-report data), and Authentication-Results

The signing cases send an unsigned message; the inbound cases send one pre-signed with an
RSA-2048 key published in the loopback DNS server (mailwarden.devtools.devdns, its own
process), from 127.0.0.1, which SPF authorises for the envelope domain and the HELO name, and
the DMARC record asks p=reject: every verdict is pass. smtp-source sends the prepared file
with -F (it
sends the file's lines as they are, CRLF-terminated and dot-stuffed, and adds no header of its
own); the file is sized so that what the client sends is --size bytes, signature included.

A message counts once smtp-sink has taken it (its "mesg=" counter), so messages/s is --messages
divided by the time from the start of smtp-source to the last delivery. Each case ends only
when Postfix's queue is empty. Before the measured run, each case sends a sample of messages
(--sample) through the same smtpd and milters to a second recipient domain that Postfix
relays to tests/integration/smtpsink.py, which stores every message byte for byte; the bench
checks the headers on those: for signing a DKIM-Signature d=bench.example that verifies
(mailwarden's verifier, key from the loopback DNS), for inbound Authentication-Results by
mx.test.example (Postfix's myhostname) with spf=pass, dkim=pass and dmarc=pass (across
OpenDKIM's and OpenDMARC's fields for the reference). The sample doubles as the warm-up.
smtp-sink is C and stores nothing, so it is not the bottleneck: the first line printed is
smtp-source straight into smtp-sink, without Postfix. Warnings in Postfix's log during a case
are added to its row.

DNS: OpenDMARC 1.4.2 resolves only through /etc/resolv.conf, i.e. port 53, so the devdns
server listens on port 53 of a loopback address of its own (opendmarc.py's
loopback_dns_host()), and every milter resolves from it. OpenDMARC (libresolv) caches no
answer; OpenDKIM (libunbound) and mailwarden cache for the TTL.

mailwarden runs with its default number of worker processes (2 per core). OpenDKIM and
OpenDMARC are one process each, with libmilter's thread per connection: their normal form,
with no worker count to set.

Run (root; Debian's postfix, opendkim and opendmarc packages):
    .venv/bin/python benchmarks/postfix_bench.py [--messages 2000] [--sessions 20] [--size 4096]
        [--sample 20] [--rounds 3] [--cases none opendkim-sign ...] [--keep]
It exits 1 if a case failed (not for a skipped one).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests"))

from daemon import Daemon  # noqa: E402
from dkim_bench import children, start_dns  # noqa: E402
from milterload import make_message  # noqa: E402
from opendkim import OpenDKIM, opendkim_available  # noqa: E402
from opendmarc import (  # noqa: E402
    OpenDMARC,
    loopback_dns_host,
    namespace_problem,
    opendmarc_available,
)
from postfix import MYHOSTNAME, PostfixInstance, free_port, postfix_available  # noqa: E402
from verify_bench import busy_seconds, cpu_seconds  # noqa: E402

from mailwarden.config import default_workers  # noqa: E402
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private  # noqa: E402
from mailwarden.dkim.sign import sign_message  # noqa: E402
from mailwarden.dkim.verify import verify_message  # noqa: E402
from mailwarden.dns import Resolver, parse_nameserver  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
DOMAIN = "bench.example"
SELECTOR = "pf2048"
SENDER = f"alice@{DOMAIN}"
HELO = f"client.{DOMAIN}"
MEASURED_RCPT = "bob@sink.example"  # Postfix relays this domain to smtp-sink (transport_maps)
SAMPLE_RCPT = "bob@sample.example"  # and every other domain to the storing smtpsink.py
SPF_RECORD = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC_RECORD = "v=DMARC1; p=reject; adkim=r; aspf=r"
DRAIN_TIMEOUT = 300.0


# ---- smtp-source and smtp-sink -----------------------------------------------------------------


class CountingSink:
    """smtp-sink on a free loopback port, storing nothing; counts the messages it has taken
    from its -c output ("sess=N quit=N mesg=N", one update per line ended by CR)."""

    def __init__(self) -> None:
        self.port = 0
        self.count = 0
        self._changed = threading.Condition()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            # as root smtp-sink insists on -u; it only needs its listening socket
            self._process = subprocess.Popen(
                [SMTP_SINK, "-4", "-c", "-u", "nobody", "-m", "1024",
                 f"127.0.0.1:{self.port}", "1024"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            if self._wait_listening():
                return
            self.stop()
        raise SystemExit("smtp-sink did not start")

    def _wait_listening(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            time.sleep(0.05)
        return False

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        pending = b""
        counter = re.compile(rb"mesg=(\d+)")
        while chunk := os.read(self._process.stdout.fileno(), 4096):
            pending += chunk
            *updates, pending = re.split(rb"[\r\n]", pending)
            found = [int(m.group(1)) for u in updates if (m := counter.search(u))]
            if found:
                with self._changed:
                    self.count = max(self.count, *found)
                    self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> float | None:
        """Wait until smtp-sink has taken `count` messages in all; the time.monotonic() at which
        this was seen, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.5))
        return time.monotonic()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None


def smtp_source(port: int, message_file: Path, count: int, sessions: int, rcpt: str) -> float:
    """Send `count` copies of `message_file` over `sessions` parallel SMTP sessions (a new
    session per message) to 127.0.0.1:port; the seconds it took. Any refusal is fatal."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [SMTP_SOURCE, "-4", "-s", str(sessions), "-m", str(count), "-f", SENDER, "-t", rcpt,
             "-M", HELO, "-F", str(message_file), f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=DRAIN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise CaseError(f"smtp-source did not finish in {DRAIN_TIMEOUT:.0f} s") from None
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise CaseError(f"smtp-source failed ({done.returncode}): "
                        f"{(done.stdout + done.stderr).strip()[-500:]}")
    return elapsed


# ---- messages, keys, DNS -----------------------------------------------------------------------


def signed(message: bytes, key: SigningKey) -> bytes:
    fields = sign_message(message, [key])
    head = b"".join(f"{name}:{value}".replace("\r\n", "\n").replace("\n", "\r\n").encode()
                    + b"\r\n" for name, value in fields)
    return head + message


def message_files(workdir: Path, size: int, key: SigningKey) -> tuple[Path, Path]:
    """The unsigned and the signed message, each `size` bytes on the wire, written with LF line
    ends for smtp-source -F (which ends every line with CRLF)."""
    plain = make_message(size, from_addr=SENDER, to_addr=MEASURED_RCPT)
    overhead = len(signed(plain, key)) - len(plain)  # the same for any body: fixed-size tags
    presigned = signed(make_message(max(size - overhead, 1024), from_addr=SENDER,
                                    to_addr=MEASURED_RCPT), key)
    paths = workdir / "unsigned.eml", workdir / "signed.eml"
    for path, data in zip(paths, (plain, presigned), strict=True):
        path.write_bytes(data.replace(b"\r\n", b"\n"))
    return paths


# ---- checks on delivered samples ---------------------------------------------------------------


class CaseError(Exception):
    """A case could not be measured (the reason is printed in its row)."""


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of every header field of a CRLF message."""
    head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", head)
    return [(name.strip(), value.strip()) for name, _, value in
            (line.partition(":") for line in unfolded.split("\r\n")) if name]


def check_signed(messages: list[bytes], dns_host: str) -> str:
    """Every sampled message carries a DKIM-Signature by DOMAIN that verifies (mailwarden's
    verifier, keys from the loopback DNS server)."""
    resolver = Resolver(nameservers=[parse_nameserver(f"{dns_host}:53")], timeout=2.0,
                        lifetime=4.0)
    for message in messages:
        verdicts = verify_message(message, resolver)
        if not any(v.result == "pass" and v.domain == DOMAIN for v in verdicts):
            raise CaseError(f"a delivered message has no valid DKIM-Signature by {DOMAIN} "
                            f"({verdicts}):\n{message[:1500].decode(errors='replace')}")
    return f"{len(messages)} sampled: DKIM-Signature d={DOMAIN}, verifies"


def check_inbound(messages: list[bytes]) -> str:
    wanted = ["spf=pass", "dkim=pass", "dmarc=pass"]
    for message in messages:
        results = [v for n, v in header_fields(message)
                   if n.lower() == "authentication-results"
                   and v.split(";", 1)[0].strip().lower() == MYHOSTNAME]
        missing = [w for w in wanted if not any(re.search(rf"\b{w}\b", r) for r in results)]
        if missing:
            raise CaseError(f"a delivered message lacks {', '.join(missing)} in "
                            f"Authentication-Results by {MYHOSTNAME}: {results}")
    return f"{len(messages)} sampled: Authentication-Results {' '.join(wanted)}"


class BenchPostfix(PostfixInstance):
    """PostfixInstance, its configuration files backdated once written: Postfix programs wait,
    in 0.3 s steps, until main.cf is older than the current second (so as not to read a file
    being written), which cost ~2 s per start. The files are complete when backdated."""

    def _write_config(self) -> None:
        super()._write_config()
        past = time.time() - 2
        for path in self.config_dir.iterdir():
            os.utime(path, (past, past))


# ---- the cases ---------------------------------------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    dns_host: str
    key: SigningKey
    unsigned: Path
    presigned: Path
    sink: CountingSink
    args: argparse.Namespace
    mx: PostfixInstance  # started and stopped by each case, with that case's milters


class Service(Protocol):
    """A milter harness: OpenDKIM, OpenDMARC or the mailwarden Daemon."""

    def start(self) -> None: ...

    def stop(self) -> Any: ...


@dataclass
class Stack:
    """What a case puts in front of Postfix: the smtpd_milters value, the message it sends,
    the check on delivered samples, and the milters to start (all known before they start, so
    that they and Postfix can start at the same time)."""

    milters: str | None
    message: Path
    check: Callable[[list[bytes]], str]
    services: list[Service] = field(default_factory=list)


@dataclass
class Result:
    name: str
    delivered_per_s: float | None = None
    accepted_per_s: float | None = None
    note: str = ""
    machine_ms: float | None = None  # CPU of the whole machine per message (both cores)
    milter_ms: float | None = None  # CPU of the milter processes per message


def service_pids(services: list[Any]) -> list[int]:
    """The processes of these milter harnesses and all their descendants (pre-forked
    workers; OpenDMARC's namespace wrapper)."""
    roots = [proc.pid for service in services
             for proc in (getattr(service, "process", None), getattr(service, "_proc", None))
             if proc is not None]
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children(pid))
    return found


def mailwarden_daemon(setup: Setup, workdir: Path, socket_dir: Path, rules: dict[str, Any],
                      extra: dict[str, Any], transport: str) -> Daemon:
    return Daemon(workdir / "mailwarden", {
        "transport": transport,
        "listen": f"unix:{socket_dir}/mailwarden.sock", "socket_mode": "0666",
        "authserv_id": MYHOSTNAME, "log_level": "warning", "drain_timeout": 5,
        # workers: not set, the default (2 per core)
        "dns": {"nameservers": [f"{setup.dns_host}:53"], "timeout": 2.0},
        **extra, "rules": rules,
    })


def no_milter(setup: Setup, workdir: Path, socket_dir: Path) -> Stack:
    return Stack(None, setup.unsigned, lambda messages: f"{len(messages)} sampled: delivered")


def opendkim_signing(setup: Setup, workdir: Path, socket_dir: Path) -> Stack:
    odk = OpenDKIM(workdir / "opendkim", mode="s", dns=(setup.dns_host, 53),
                   keys=[(DOMAIN, SELECTOR, Path(setup.key.path))],
                   socket=f"unix:{socket_dir}/opendkim.sock", log=False)
    return Stack(f"unix:{socket_dir}/opendkim.sock", setup.unsigned,
                 lambda m: check_signed(m, setup.dns_host), [odk])


def mailwarden_noop(setup: Setup, workdir: Path, socket_dir: Path, transport: str) -> Stack:
    """mailwarden with no rules: the cost of being a milter of this transport at all."""
    daemon = mailwarden_daemon(setup, workdir, socket_dir, {}, {}, transport)
    return Stack(f"unix:{socket_dir}/mailwarden.sock", setup.unsigned,
                 lambda messages: f"{len(messages)} sampled: delivered", [daemon])


def mailwarden_signing(setup: Setup, workdir: Path, socket_dir: Path, transport: str) -> Stack:
    key = setup.key
    daemon = mailwarden_daemon(setup, workdir, socket_dir, {"eom": [
        {"name": "sign", "check": "dkim_sign", "allowed_hosts": "all"}]}, {
        "hosts": {"all": ["0.0.0.0/0", "::/0"]},
        "signing": {"keys": [{"domain": key.domain, "selector": key.selector,
                              "key": key.path}]}}, transport)
    return Stack(f"unix:{socket_dir}/mailwarden.sock", setup.unsigned,
                 lambda m: check_signed(m, setup.dns_host), [daemon])


def reference_inbound(setup: Setup, workdir: Path, socket_dir: Path) -> Stack:
    if not opendmarc_available():
        raise CaseError("skipped: OpenDMARC is not installed (apt-get install opendmarc)")
    if (problem := namespace_problem()) is not None:
        raise CaseError(f"skipped: OpenDMARC cannot be pointed at the loopback DNS: {problem}")
    odk = OpenDKIM(workdir / "opendkim", mode="v", dns=(setup.dns_host, 53),
                   socket=f"unix:{socket_dir}/opendkim.sock", log=False)
    # OpenDMARC trusts OpenDKIM's Authentication-Results (authserv-id: Postfix's myhostname),
    # evaluates SPF itself, and records every evaluation in its HistoryFile (the aggregate
    # report data, as mailwarden's DMARC store does). Its default IgnoreHosts is 127.0.0.1,
    # where smtp-source connects from: nothing is ignored here.
    odmarc = OpenDMARC(workdir / "opendmarc", dns=(setup.dns_host, 53), authserv_id=MYHOSTNAME,
                       ignore_hosts=[], socket=f"unix:{socket_dir}/opendmarc.sock", log=False,
                       extra_conf={"HistoryFile": str(workdir / "opendmarc.history")})
    return Stack(f"unix:{socket_dir}/opendkim.sock, unix:{socket_dir}/opendmarc.sock",
                 setup.presigned, check_inbound, [odk, odmarc])


def mailwarden_inbound(setup: Setup, workdir: Path, socket_dir: Path, transport: str) -> Stack:
    daemon = mailwarden_daemon(setup, workdir, socket_dir, {
        "mail": [{"name": "spf", "check": "spf", "header": "auth"}],
        "eom": [{"name": "dkim", "check": "dkim_verify"},
                {"name": "dmarc", "check": "dmarc", "enforce": True}],
    }, {"dmarc": {"store": str(workdir / "dmarc.db")}}, transport)
    return Stack(f"unix:{socket_dir}/mailwarden.sock", setup.presigned, check_inbound, [daemon])


CASES: dict[str, tuple[str, Callable[[Setup, Path, Path], Stack]]] = {
    "none": ("no milter (ceiling)", no_milter),
    "opendkim-sign": ("OpenDKIM signing", opendkim_signing),
    "reference-inbound": ("OpenDKIM verify + OpenDMARC", reference_inbound),
}
# mailwarden's cases for each transport: a do-nothing daemon (the ceiling of that transport on
# these shared cores), signing, and the inbound checks
TRANSPORTS = ("libmilter", "native")
for _transport in TRANSPORTS:
    _suffix = "" if _transport == "libmilter" else "-native"
    CASES[f"mailwarden-noop{_suffix}"] = (f"mailwarden no rules [{_transport}]",
                                          functools.partial(mailwarden_noop,
                                                            transport=_transport))
    CASES[f"mailwarden-sign{_suffix}"] = (f"mailwarden signing [{_transport}]",
                                          functools.partial(mailwarden_signing,
                                                            transport=_transport))
    CASES[f"mailwarden-inbound{_suffix}"] = (f"mailwarden SPF+DKIM+DMARC [{_transport}]",
                                             functools.partial(mailwarden_inbound,
                                                               transport=_transport))


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that Postfix's smtpd (user postfix) can reach, for sockets."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_queue_empty(mx: PostfixInstance, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "Mail queue is empty" not in (queue := mx.mailq()):
        if time.monotonic() > deadline:
            raise CaseError(f"Postfix's queue is not empty after {timeout:.0f} s:\n{queue[:2000]}")
        time.sleep(0.1)


def all_at_once(calls: list[Callable[[], Any]]) -> None:
    """Run the calls in parallel threads; raise the first exception any of them raised."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def run_case(setup: Setup, key: str) -> Result:
    label, build = CASES[key]
    args = setup.args
    workdir = setup.workdir / key
    result = Result(label)
    with private_dir(f"postfix-bench-{key}-") as socket_dir:
        running: list[Service | PostfixInstance] = []
        try:
            stack = build(setup, workdir, socket_dir)
            mx = setup.mx
            mx.milter = stack.milters  # read by start(), which writes a fresh main.cf
            if (mx.queue_dir / "pid").is_dir():
                # Postfix's own quick-start marker (as `postfix quick-stop` leaves it): skip
                # postfix-script's permission checks, done at the first start (~2 s each)
                (mx.queue_dir / "quick-start").touch()
            running = [mx, *stack.services]
            log_start = len(mx.maillog())
            all_at_once([service.start for service in running])
            # the sample (and warm-up): same smtpd and milters, relayed to the storing sink
            stored = len(mx.messages())
            smtp_source(mx.smtp_port, stack.message, args.sample,
                        min(args.sessions, args.sample), SAMPLE_RCPT)
            sample = mx.wait_for_messages(stored + args.sample, timeout=120)[stored:]
            result.note = stack.check(sample)
            wait_queue_empty(mx, DRAIN_TIMEOUT)
            before = setup.sink.count
            pids = service_pids(stack.services)
            cpu_before = busy_seconds(), cpu_seconds(pids)
            started = time.monotonic()
            sent = smtp_source(mx.smtp_port, stack.message, args.messages, args.sessions,
                               MEASURED_RCPT)
            finished = setup.sink.wait_for(before + args.messages, DRAIN_TIMEOUT)
            if finished is None:
                raise CaseError(f"{setup.sink.count - before} of {args.messages} messages "
                                f"reached smtp-sink in {DRAIN_TIMEOUT:.0f} s\n{mx.mailq()}")
            cpu_after = busy_seconds(), cpu_seconds(pids)
            result.machine_ms = (cpu_after[0] - cpu_before[0]) * 1000 / args.messages
            result.milter_ms = (cpu_after[1] - cpu_before[1]) * 1000 / args.messages
            wait_queue_empty(mx, DRAIN_TIMEOUT)
            extra = setup.sink.count - before - args.messages
            if extra:
                raise CaseError(f"smtp-sink took {extra} messages more than were sent")
            result.delivered_per_s = args.messages / (finished - started)
            result.accepted_per_s = args.messages / sent
            # (cleanup's "file system clock is 1 seconds ahead of local clock" and "resetting
            # file time stamps" come from this VM's coarse file timestamps, not from mail)
            warnings = [line for line in mx.maillog()[log_start:].splitlines()
                        if re.search(r": (warning|error|fatal|panic): ", line)
                        and "file system clock is" not in line
                        and "resetting file time stamps" not in line]
            if warnings:
                result.note += f"; {len(warnings)} Postfix warnings, first: {warnings[0]}"
        except CaseError as exc:
            result.note = str(exc)
        except (RuntimeError, AssertionError, OSError) as exc:  # a harness did not start
            result.note = f"failed: {exc}"
        finally:
            # Postfix first (its smtpd holds milter connections), then the milters
            if running:
                with contextlib.suppress(Exception):
                    running[0].stop()
                with contextlib.suppress(Exception):
                    all_at_once([service.stop for service in running[1:]])
    return result


def direct_rate(setup: Setup) -> float:
    """smtp-source straight into smtp-sink: what the client and the sink manage alone."""
    count: int = setup.args.messages
    before = setup.sink.count
    started = time.monotonic()
    smtp_source(setup.sink.port, setup.unsigned, count, setup.args.sessions, MEASURED_RCPT)
    finished = setup.sink.wait_for(before + count, 60)
    if finished is None:
        raise SystemExit("smtp-sink did not count the messages smtp-source sent it")
    return count / (finished - started)


def summarise(rows: list[Result]) -> Result:
    """One row for a case: the median of its rounds, or the first failure."""
    for row in rows:
        if row.delivered_per_s is None:
            return row
    return Result(rows[0].name,
                  statistics.median(row.delivered_per_s or 0.0 for row in rows),
                  statistics.median(row.accepted_per_s or 0.0 for row in rows),
                  rows[0].note,
                  statistics.median(row.machine_ms or 0.0 for row in rows),
                  statistics.median(row.milter_ms or 0.0 for row in rows))


def round_ratio(runs: dict[str, list[Result]], case: str, base: str) -> str:
    """The median over rounds of case/base, both measured in the same round (the machine's
    speed drifts between rounds more than the cases differ)."""
    pairs = [(a.delivered_per_s, b.delivered_per_s)
             for a, b in zip(runs.get(case, []), runs.get(base, []), strict=False)]
    ratios = [a / b for a, b in pairs if a and b]
    if not ratios:
        return "n/a"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="per case (default 2000)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (4096)")
    parser.add_argument("--sample", type=int, default=20,
                        help="messages per case whose headers are checked (also the warm-up)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every case is run, in turn; medians are reported (3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (Postfix logs, samples, milter configs)")
    args = parser.parse_args()
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK) if not os.access(p, os.X_OK)]
    if missing or not postfix_available():
        raise SystemExit(f"Postfix is not installed ({', '.join(missing) or 'postfix'})")
    if not opendkim_available():
        raise SystemExit("OpenDKIM is not installed (apt-get install opendkim)")
    if os.geteuid() != 0:
        raise SystemExit("running Postfix needs root")

    workdir = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
    workdir.chmod(0o755)
    key_path = workdir / f"{SELECTOR}.pem"
    write_private(generate("rsa", 2048), str(key_path))
    key = load_key(DOMAIN, SELECTOR, str(key_path))
    unsigned, presigned = message_files(workdir, args.size, key)
    zone: dict[str, Any] = {
        key.dns_name: [{"TXT": key.public_record}],
        DOMAIN: [{"TXT": SPF_RECORD}, {"A": "127.0.0.1"}],
        HELO: [{"TXT": SPF_RECORD}, {"A": "127.0.0.1"}],
        f"_dmarc.{DOMAIN}": [{"TXT": DMARC_RECORD}],
    }
    dns_host = loopback_dns_host()
    dns, _ = start_dns(zone, workdir, dns_host, 53)
    sink = CountingSink()
    runs: dict[str, list[Result]] = {}
    try:
        sink.start()
        route = f"inline:{{ {MEASURED_RCPT.partition('@')[2]}=smtp:[127.0.0.1]:{sink.port} }}"
        mx = BenchPostfix(workdir / "postfix", milter=None,
                          extra_main_cf={"transport_maps": route})
        setup = Setup(workdir, dns_host, key, unsigned, presigned, sink, args, mx)
        sizes = [len(path.read_bytes().replace(b"\n", b"\r\n")) for path in (unsigned, presigned)]
        print(f"postfix_bench: {args.messages} messages per case, {args.sessions} sessions, "
              f"{sizes[0]} bytes unsigned / {sizes[1]} bytes pre-signed on the wire, "
              f"mailwarden workers: {default_workers()}", flush=True)
        print(f"smtp-source -> smtp-sink directly (no Postfix): {direct_rate(setup):,.0f} msg/s",
              flush=True)
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            for case in args.cases:
                row = run_case(setup, case)
                runs.setdefault(case, []).append(row)
                shown = (f"{row.delivered_per_s:,.0f} msg/s, CPU ms/msg: machine "
                         f"{row.machine_ms:.2f}, milters {row.milter_ms:.2f}"
                         if row.delivered_per_s else "-")
                print(f"  {row.name}: {shown}  ({row.note})", flush=True)
                if row.delivered_per_s is None:
                    break
    finally:
        sink.stop()
        dns.terminate()
        dns.wait(10)

    results = {case: summarise(rows) for case, rows in runs.items()}
    print()
    print(f"median of {args.rounds} round(s); ratios are medians of the per-round ratios "
          f"(each case against the ceiling measured in the same round)")
    print("CPU ms per message (medians): of the whole machine (2 cores: Postfix, milters, "
          "smtp-source, smtp-sink, DNS) and of the milter processes alone")
    print(f"{'case':<42}{'delivered/s':>12}{'runs':>12}  {'vs ceiling (runs)':<20}"
          f"{'machine':>8}{'milters':>8}  check")
    for case, row in results.items():
        if row.delivered_per_s is None:
            print(f"{row.name:<42}{'-':>12}{'':>12}  {'-':<20}{'':>16}  {row.note}")
            continue
        rates = [r.delivered_per_s for r in runs[case] if r.delivered_per_s]
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(f"{row.name:<42}{row.delivered_per_s:>12,.0f}{spread:>12}  "
              f"{round_ratio(runs, case, 'none'):<20}{row.machine_ms or 0:>8.2f}"
              f"{row.milter_ms or 0:>8.2f}  {row.note}")
    print()
    for transport in TRANSPORTS:
        suffix = "" if transport == "libmilter" else "-native"
        print(f"[{transport}] signing / OpenDKIM:                 "
              f"{round_ratio(runs, 'mailwarden-sign' + suffix, 'opendkim-sign')}")
        print(f"[{transport}] inbound / OpenDKIM+OpenDMARC:       "
              f"{round_ratio(runs, 'mailwarden-inbound' + suffix, 'reference-inbound')}")
        print(f"[{transport}] signing / no rules, same transport: "
              f"{round_ratio(runs, 'mailwarden-sign' + suffix, 'mailwarden-noop' + suffix)}")
        print(f"[{transport}] inbound / no rules, same transport: "
              f"{round_ratio(runs, 'mailwarden-inbound' + suffix, 'mailwarden-noop' + suffix)}")
    print(f"no rules, libmilter / native:                 "
          f"{round_ratio(runs, 'mailwarden-noop', 'mailwarden-noop-native')}")
    failed = [row for row in results.values() if row.delivered_per_s is None
              and not row.note.startswith("skipped:")]
    summary = {row.name: row.delivered_per_s for row in results.values()}
    print(f"json: {json.dumps(summary)}")
    if failed or args.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
