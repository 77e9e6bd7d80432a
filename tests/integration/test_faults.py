"""Faults, each through a real Postfix on loopback with the real daemon as its milter (issue 8):

- DNS down (nothing listening), answering SERVFAIL, or answering after dns.lifetime: every check
  that needs DNS gives temperror; the client gets 451 with the check's own enhanced code (SPF
  4.7.24 at MAIL FROM, DKIM 4.7.20 and DMARC 4.7.1 at the end of data) or, where a rule says
  `on: {temperror: continue}`, the message goes through. Never a 5xx, and every reply comes
  within the DNS lifetime per lookup (far inside Postfix's milter timeouts).
- mailwarden SIGKILLed (master and workers at once) in the middle of a 500-message burst:
  Postfix applies milter_default_action = tempfail, the senders retry like an MTA, and after a
  restart every message is delivered exactly once; the DMARC store passes integrity_check.
- mailwarden reloaded (SIGHUP) and restarted (SIGTERM drains, then a new start) under load:
  no reply but 250 during reloads; during the restart only the attempts that met the downtime
  are tempfailed, and every message is delivered exactly once.
- The spool directory and the DMARC store on a full or read-only file system (in a private
  mount namespace of the daemon's): messages still get their verdicts (and DKIM, reading the
  body back, still passes), the failure is logged once with its cause, nothing crashes.

One Postfix (and its sink) serves the whole module; each test starts its own daemon on the same
milter socket. The daemon and its DNS server are ours to stop, kill and restart.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from postfix import PostfixInstance

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private
from mailwarden.dkim.sign import SignOptions, sign_message

pytestmark = [
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="Postfix is not installed (scripts/setup.sh --test)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Postfix needs root"),
]

AUTHSERV_ID = "mx.test.example"  # Postfix's myhostname in the harness
DNS_TIMEOUT, DNS_LIFETIME = 0.5, 1.0
SPF_PASS = "v=spf1 ip4:127.0.0.0/8 -all"

# Which rule sees a message is chosen by its MAIL FROM domain:
#   spf.test      SPF with its default actions (temperror: tempfail 451 4.7.24)
#   dkim.test     dkim_verify with on: {temperror: tempfail} (451 4.7.20)
#   dmarc.test    dmarc with on: {temperror: tempfail} (451 4.7.1)
#   lenient.test  every check with on: {temperror: continue}
#   burst.test    the load tests: SPF, DKIM and DMARC with their default actions
CHECKED = ["spf.test", "dkim.test", "dmarc.test", "lenient.test"]
ZONE: dict[str, list[object]] = {
    **{domain: [{"TXT": SPF_PASS}] for domain in [*CHECKED, "burst.test", "disk.test"]},
    "_dmarc.lenient.test": [{"TXT": "v=DMARC1; p=none"}],
    "_dmarc.dmarc.test": [{"TXT": "v=DMARC1; p=none"}],
    "_dmarc.dkim.test": [{"TXT": "v=DMARC1; p=none"}],
    "_dmarc.burst.test": [{"TXT": "v=DMARC1; p=reject"}],
    "_dmarc.disk.test": [{"TXT": "v=DMARC1; p=reject"}],
    "_dmarc.strict.test": [{"TXT": "v=DMARC1; p=reject"}],
    "strict.test": [{"A": "192.0.2.1"}],
    # DMARC p=reject passed by DKIM alone (envelope at an ESP), SPF alone, or both; TTL 0, so
    # that every message asks the DNS server again (an outage meets every message), but the
    # ESP's SPF record stays cached, as a busy ESP's would: its mail meets the outage at the
    # DKIM key, at the end of data
    "esp.test": [{"TXT": SPF_PASS}],
    "spfonly.test": [{"TXT": SPF_PASS, "ttl": 0}],
    "both.test": [{"TXT": SPF_PASS, "ttl": 0}],
    "_dmarc.signed.test": [{"TXT": "v=DMARC1; p=reject", "ttl": 0}],
    "_dmarc.spfonly.test": [{"TXT": "v=DMARC1; p=reject", "ttl": 0}],
    "_dmarc.both.test": [{"TXT": "v=DMARC1; p=reject", "ttl": 0}],
}
ALIGNED_BY_DKIM = ("signed.test", "both.test")
# Every name the CHECKED messages make mailwarden look up: in the SERVFAIL zone each answers
# SERVFAIL (a name missing from it would get NXDOMAIN, not a fault).
LOOKED_UP = [*CHECKED, "sel._domainkey.dkim.test", "sel._domainkey.lenient.test",
             "_dmarc.dmarc.test", "_dmarc.lenient.test", "_dmarc.dkim.test"]


def only(*domains: str) -> dict[str, Any]:
    return {"sender_domain_in": list(domains)}


def other(*domains: str) -> dict[str, Any]:
    return {"not": only(*domains)}


def rules(**extra: Any) -> dict[str, Any]:
    return {
        "mail": [
            {"name": "spf", "check": "spf", "header": "auth",
             "when": other("lenient.test", "dkim.test", "dmarc.test")},
            {"name": "spf lenient", "check": "spf", "header": "auth",
             "on": {"temperror": "continue"},
             "when": only("lenient.test", "dkim.test", "dmarc.test")},
        ],
        "eom": [
            {"name": "dkim strict", "check": "dkim_verify", "on": {"temperror": "tempfail"},
             "when": only("dkim.test")},
            {"name": "dkim", "check": "dkim_verify", "on": {"temperror": "continue"},
             "when": other("dkim.test")},
            {"name": "dmarc strict", "check": "dmarc", "on": {"temperror": "tempfail"},
             "when": only("dmarc.test")},
            {"name": "dmarc", "check": "dmarc", "on": {"temperror": "continue"},
             "when": other("dmarc.test")},
        ],
        **extra,
    }


class Milter(Daemon):
    """`Daemon` in a session of its own (so that the whole process group can be SIGKILLed at
    once, as the kernel's OOM killer or `kill -9 -PGID` would), optionally run through a
    command prefix (nsenter) and with extra environment variables."""

    def __init__(self, workdir: Path, config: dict[str, Any], prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, config)
        self.prefix = prefix
        self.env = {**os.environ, **(env or {})}

    def start(self, timeout: float = 15.0) -> None:
        seen = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "mailwarden", "run", "--config",
                 str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(r"started \d+ worker", self.log()[seen:]):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"mailwarden exited at start:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"mailwarden did not start:\n{self.log()}")

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at the same instant."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and wait for the drain; past `timeout`, SIGKILL the group (the master is
        not reaped yet then, so its PID is still ours)."""
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else 0
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"mailwarden did not stop in {timeout} s:\n{self.log()}") \
                from None


@dataclass
class Env:
    workdir: Path
    postfix: PostfixInstance
    dns: DevDNSServer
    socket: str
    keys: dict[str, SigningKey]
    milters: list[Milter] = field(default_factory=list)

    def milter(self, name: str, config: dict[str, Any], **kwargs: Any) -> Milter:
        base: dict[str, Any] = {
            "listen": f"unix:{self.socket}", "socket_mode": "0666",
            "authserv_id": AUTHSERV_ID, "workers": 2, "drain_timeout": 5,
            # root keeps root: the file-system faults below are made with mounts (a read-only
            # mount, a full tmpfs), which hold for root as for anyone
            "user": "root",
            "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": DNS_TIMEOUT,
                    "lifetime": DNS_LIFETIME},
            "rules": rules(),
        }
        milter = Milter(self.workdir / name, {**base, **config}, **kwargs)
        self.milters.append(milter)
        return milter


def _key(workdir: Path, domain: str) -> SigningKey:
    path = workdir / f"{domain}.pem"
    write_private(generate("ed25519"), str(path))
    return load_key(domain, "sel", str(path))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("faults")
    keys = {domain: _key(workdir, domain) for domain in ("dkim.test", "lenient.test",
                                                         "disk.test", *ALIGNED_BY_DKIM)}
    dns = DevDNSServer(normal_zone(keys), host="127.0.0.1", port=0)
    dns.start()
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-faults-"))
    sockets.chmod(0o755)  # Postfix's smtpd (user postfix) connects to the socket in here
    postfix = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock",
                              extra_main_cf={"default_process_limit": "250"})
    state = Env(workdir, postfix, dns, f"{sockets}/milter.sock", keys)
    try:
        postfix.start()
        yield state
    finally:
        for milter in state.milters:
            milter.stop()
        postfix.stop()
        dns.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def normal_zone(keys: dict[str, SigningKey]) -> dict[str, list[object]]:
    zone = dict(ZONE)
    for key in keys.values():
        ttl = {"ttl": 0} if key.domain in ALIGNED_BY_DKIM else {}
        zone[key.dns_name] = [{"TXT": key.public_record, **ttl}]
    return zone


# ---- sending ----------------------------------------------------------------------------------


def message(from_domain: str, subject: str, body: str = "", key: SigningKey | None = None,
            ) -> bytes:
    data = (f"From: <a@{from_domain}>\r\nTo: <bob@ours.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@faults.test>\r\n\r\n"
            f"{body or 'body of ' + subject}\r\n").encode()
    if key is None:
        return data
    fields = sign_message(data, [key], SignOptions())
    return "".join(f"{n}:{v}".replace("\n", "\r\n") + "\r\n" for n, v in fields).encode() + data


@dataclass
class Timed:
    """The replies of one SMTP transaction, with how long each one took."""

    replies: list[tuple[str, int, str, float]] = field(default_factory=list)

    def add(self, stage: str, call: Callable[[], tuple[int, bytes]]) -> int:
        started = time.monotonic()
        code, text = call()
        self.replies.append((stage, code, text.decode(errors="replace"),
                             time.monotonic() - started))
        return code

    @property
    def final(self) -> tuple[str, int, str, float]:
        return self.replies[-1]

    def took(self, stage: str) -> float:
        return next(t for s, _, _, t in self.replies if s == stage)


def transact(port: int, source: str, mail_from: str, data: bytes) -> Timed:
    """One transaction, command by command, stopping at the first refusal."""
    timed = Timed()
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=90) as smtp:
        smtp.ehlo(f"[{source}]")  # an address literal: no HELO identity to check
        if timed.add("mail", lambda: smtp.mail(mail_from)) != 250:
            return timed
        if timed.add("rcpt", lambda: smtp.rcpt("bob@ours.test")) != 250:
            return timed
        timed.add("eom", lambda: smtp.data(data))
    return timed


def delivered(env: Env, subject: str, timeout: float = 20.0) -> str:
    """The unfolded header block of the delivered message with this Subject."""
    wanted = f"Subject: {subject}\r\n".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in env.postfix.messages():
            if wanted in raw:
                head = raw.split(b"\r\n\r\n", 1)[0].decode()
                return re.sub(r"\r\n[ \t]+", " ", head)
        time.sleep(0.05)
    raise AssertionError(f"{subject!r} was not delivered\n{env.postfix.mailq()}")


def our_results(head: str) -> str:
    return next(line for line in head.split("\r\n")
                if line.startswith(f"Authentication-Results: {AUTHSERV_ID}"))


class RetryingSender:
    """Sends numbered messages from `threads` concurrent clients, each message over a new SMTP
    session, and retries a message that got a 4xx reply or lost its connection (a little later,
    like an MTA's deferred queue) until it is accepted or refused with a 5xx."""

    def __init__(self, port: int, make: Callable[[int], bytes],
                 mail_from: str | Callable[[int], str], threads: int = 10) -> None:
        self.port, self.make, self.mail_from = port, make, mail_from
        self.todo: queue.Queue[int | None] = queue.Queue()
        self.accepted: dict[int, int] = {}  # number -> attempts it took
        self.accepted_at: list[float] = []
        self.tempfails: list[tuple[float, float, int, str]] = []  # start, end, number, reply
        self.permfails: list[tuple[int, str]] = []
        self.attempts = Counter[int]()
        self._lock = threading.Lock()
        self._open = 0
        self._idle = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def send(self, numbers: Iterator[int] | range) -> None:
        for number in numbers:
            with self._lock:
                self._open += 1
            self.todo.put(number)

    def _run(self, index: int) -> None:
        source = f"127.0.0.{20 + index}"
        while (number := self.todo.get()) is not None:
            started = time.monotonic()
            with self._lock:
                self.attempts[number] += 1
            reply = ""
            try:
                with smtplib.SMTP("127.0.0.1", self.port, source_address=(source, 0),
                                  timeout=90) as smtp:
                    smtp.ehlo(f"[{source}]")
                    sender = self.mail_from if isinstance(self.mail_from, str) \
                        else self.mail_from(number)
                    smtp.sendmail(sender, ["bob@ours.test"], self.make(number))
                code = 250
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = next(iter(exc.recipients.values()))
                reply = f"{code} {text.decode(errors='replace')}"
            except smtplib.SMTPResponseException as exc:
                code = exc.smtp_code
                error = exc.smtp_error
                said = error.decode(errors="replace") if isinstance(error, bytes) else error
                reply = f"{code} {said}"
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                code, reply = 421, f"connection lost: {exc}"
            ended = time.monotonic()
            with self._lock:
                if code == 250:
                    self.accepted[number] = self.attempts[number]
                    self.accepted_at.append(ended)
                elif 400 <= code < 500:
                    self.tempfails.append((started, ended, number, reply))
                else:
                    self.permfails.append((number, reply))
            if 400 <= code < 500:
                time.sleep(0.2)  # the deferred queue, much shortened
                self.todo.put(number)
                continue
            with self._lock:
                self._open -= 1
                self._idle.notify_all()

    def wait(self, timeout: float) -> None:
        """Until every message sent so far is accepted or refused."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._open and time.monotonic() < deadline:
                self._idle.wait(0.1)
            assert not self._open, f"{self._open} message(s) still not accepted after {timeout} s"

    def wait_accepted(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"only {len(self.accepted)} accepted"
            time.sleep(0.01)

    def close(self) -> None:
        for _ in self._threads:
            self.todo.put(None)
        for thread in self._threads:
            thread.join(30)


@contextlib.contextmanager
def steady_stream(sender: RetryingSender, width: int, wait: float) -> Iterator[Iterator[int]]:
    """Keep `width` messages queued for the senders while the block runs (the numbers handed
    out come from the counter it yields); then wait until every one is accepted or refused."""
    numbers = itertools.count()
    feeding = threading.Event()

    def feed() -> None:
        while not feeding.is_set():
            if sender.todo.qsize() < width:
                sender.send(itertools.islice(numbers, width))
            time.sleep(0.01)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield numbers
    finally:
        feeding.set()
        feeder.join(10)
        try:
            sender.wait(timeout=wait)
        finally:
            sender.close()


SUBJECT = re.compile(rb"^Subject: (\w+) (\d+)\r$", re.MULTILINE)


def sink_counts(env: Env, tag: str) -> Counter[int]:
    counts = Counter[int]()
    for raw in env.postfix.messages():
        head = raw.split(b"\r\n\r\n", 1)[0]
        for found in SUBJECT.finditer(head):
            if found.group(1).decode() == tag:
                counts[int(found.group(2))] += 1
    return counts


def wait_sink(env: Env, tag: str, count: int, timeout: float) -> Counter[int]:
    """Until `count` distinct messages of `tag` are at the sink and Postfix's queue is empty
    (so that a late duplicate would be seen too)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = sink_counts(env, tag)
        if len(counts) >= count and "Mail queue is empty" in env.postfix.mailq():
            return sink_counts(env, tag)
        assert time.monotonic() < deadline, (
            f"{len(counts)} of {count} {tag} messages at the sink\n{env.postfix.mailq()}")
        time.sleep(0.1)


STORE_CHECK = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(json.dumps([conn.execute("PRAGMA integrity_check").fetchall(),
                  [row[0] for row in conn.execute("SELECT header_from FROM evaluations")]]))
"""


def store_rows(path: Path, enter: tuple[str, ...] = ()) -> Counter[str]:
    """PRAGMA integrity_check must say ok; then the number of evaluations per From domain. Run
    in a process of its own, `enter`ing the daemon's mount namespace if need be (SQLite
    resolves /proc/PID/root to our own root)."""
    done = subprocess.run([*enter, sys.executable, "-c", STORE_CHECK, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    integrity, domains = json.loads(done.stdout)
    assert integrity == [["ok"]], integrity
    return Counter(domains)


# ---- DNS faults -------------------------------------------------------------------------------


def _one_of_each(env: Env, mode: str) -> dict[str, Timed]:
    """The four kinds of message at once, one client each."""
    plans: dict[str, tuple[str, bytes]] = {
        "spf.test": ("x@spf.test", message("spf.test", f"{mode} spf")),
        "dkim.test": ("x@dkim.test", message("dkim.test", f"{mode} dkim",
                                              key=env.keys["dkim.test"])),
        "dmarc.test": ("x@dmarc.test", message("dmarc.test", f"{mode} dmarc")),
        "lenient.test": ("x@lenient.test", message("lenient.test", f"{mode} lenient",
                                                    key=env.keys["lenient.test"])),
    }
    out: dict[str, Timed] = {}
    errors: list[BaseException] = []

    def run(domain: str, source: str) -> None:
        try:
            out[domain] = transact(env.postfix.smtp_port, source, *plans[domain])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(domain, f"127.0.0.{10 + n}"))
               for n, domain in enumerate(plans)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return out


def _check_dns_fault(env: Env, mode: str, got: dict[str, Timed]) -> None:
    """Each failing lookup may take up to dns.lifetime (the configured time), plus a margin
    for Postfix and a loaded machine; every reply comes well before Postfix would give up on
    the milter."""
    # The margin covers Postfix, a loaded machine and libmilter's workers pool: Debian's
    # libmilter serves connections on a pool of threads that grows when all are busy, so with
    # four transactions each waiting out a slow lookup at once, one may first wait for a
    # thread (measured once: 2.01 s for a one-lookup MAIL FROM).
    per_lookup, margin = DNS_LIFETIME, 1.5
    command_timeout = float(env.postfix.main_cf()["milter_command_timeout"].rstrip("s"))
    for domain, timed in got.items():
        for stage, code, text, took in timed.replies:
            assert code < 500, f"{mode}: {domain} got {code} {text} at {stage}"
            assert took < command_timeout / 3
    spf = got["spf.test"].final
    assert spf[:3] == ("mail", 451, spf[2]) and spf[2].startswith("4.7.24 "), (mode, spf)
    assert spf[3] <= per_lookup + margin, (mode, spf)
    for domain, status in (("dkim.test", "4.7.20 "), ("dmarc.test", "4.7.1 ")):
        stage, code, text, took = got[domain].final
        assert (stage, code) == ("eom", 451) and text.startswith(status), (mode, domain, text)
        assert got[domain].took("mail") <= per_lookup + margin  # SPF: one lookup
        assert took <= per_lookup + margin, (mode, domain, took)
    lenient = got["lenient.test"]
    assert lenient.final[:2] == ("eom", 250), (mode, lenient.replies)
    assert lenient.took("mail") <= per_lookup + margin
    assert lenient.took("eom") <= 2 * per_lookup + margin  # the DKIM key, the DMARC record
    results = our_results(delivered(env, f"{mode} lenient"))
    for method in ("spf", "dkim", "dmarc"):
        assert f"{method}=temperror" in results, (mode, results)


@pytest.mark.parametrize("transport", ["libmilter", "native"])
def test_dns_down_servfail_or_late_tempfails_in_time_and_never_5xx(env: Env,
                                                                   transport: str) -> None:
    milter = env.milter(f"dns-{transport}", {"transport": transport})
    milter.start()
    timings: dict[str, dict[str, float]] = {}
    try:
        # SERVFAIL for every name looked up
        env.dns.load({**normal_zone(env.keys), **{name: ["SERVFAIL"] for name in LOOKED_UP}})
        got = _one_of_each(env, f"servfail-{transport}")
        _check_dns_fault(env, f"servfail-{transport}", got)
        timings["servfail"] = {d: max(t for *_, t in g.replies) for d, g in got.items()}
        # every answer 2.5 s late: past dns.lifetime (1 s)
        env.dns.load(normal_zone(env.keys))
        env.dns.delay = 2.5
        got = _one_of_each(env, f"late-{transport}")
        _check_dns_fault(env, f"late-{transport}", got)
        # the answers did not come in time, but each lookup did use its lifetime
        assert got["spf.test"].final[3] >= DNS_LIFETIME * 0.9
        timings["late"] = {d: max(t for *_, t in g.replies) for d, g in got.items()}
        env.dns.delay = 0.0
        # the server stopped: nothing listens on its port
        env.dns.stop()
        try:
            got = _one_of_each(env, f"down-{transport}")
        finally:
            env.dns.start()  # the same port again
        _check_dns_fault(env, f"down-{transport}", got)
        timings["down"] = {d: max(t for *_, t in g.replies) for d, g in got.items()}
        # back to normal: the same kinds of message pass
        got = _one_of_each(env, f"healthy-{transport}")
        assert {d: t.final[1] for d, t in got.items()} == dict.fromkeys(got, 250), got
        print(f"\nDNS fault reply times (slowest reply per transaction, s): {timings}")
        milter_trouble = [line for line in env.postfix.maillog().splitlines()
                          if re.search(r"warning: milter .*(timeout|timed out)", line)]
        assert not milter_trouble, milter_trouble
    finally:
        env.dns.delay = 0.0
        env.dns.load(normal_zone(env.keys))
        milter.stop()


# ---- a DNS outage never becomes a DMARC rejection ---------------------------------------------

# Every check at its defaults: SPF temperror tempfails at MAIL FROM, DMARC temperror continues.
DEFAULT_RULES = {"mail": [{"name": "spf", "check": "spf", "header": "auth"}],
                 "eom": [{"name": "dkim", "check": "dkim_verify"},
                         {"name": "dmarc", "check": "dmarc"}]}
# (MAIL FROM, From domain, signed?) of the three kinds of message that pass p=reject
ALIGNMENT_KINDS = (("bounce@esp.test", "signed.test", True),
                   ("x@spfonly.test", "spfonly.test", False),
                   ("x@both.test", "both.test", True))


def aligned_message(env: Env, tag: str, number: int) -> bytes:
    _, domain, signed = ALIGNMENT_KINDS[number % 3]
    return message(domain, f"{tag} {number}", key=env.keys[domain] if signed else None)


@pytest.mark.parametrize("mode", ["rfc9989", "legacy"])
def test_dns_outage_never_turns_into_a_dmarc_rejection(env: Env, mode: str) -> None:
    """Mail whose DMARC pass rests on DKIM alone, SPF alone or both (p=reject), with every rule
    at its defaults: a DKIM key that cannot be fetched is DKIM temperror (RFC 6376 §6.1.2) and
    then DMARC temperror, never the policy's 550. Then a steady stream through a DNS server
    stopped, and one frozen past dns.lifetime: no 5xx at all, and every message is delivered
    exactly once (the sender retrying the 4xx ones)."""
    milter = env.milter(f"outage-{mode}", {"rules": DEFAULT_RULES, "dmarc": {"mode": mode}})
    milter.start()
    try:
        # the key alone fails: SPF passes (unaligned, at the ESP), DKIM cannot be verified
        env.dns.load({**normal_zone(env.keys), "sel._domainkey.signed.test": ["SERVFAIL"]})
        timed = transact(env.postfix.smtp_port, "127.0.0.9", "bounce@esp.test",
                         message("signed.test", f"{mode} keyless", key=env.keys["signed.test"]))
        assert timed.final[:2] == ("eom", 250), timed.replies
        results = our_results(delivered(env, f"{mode} keyless"))
        assert "dkim=temperror" in results and "dmarc=temperror" in results, results
        env.dns.load(normal_zone(env.keys))

        tag = f"outage{mode.replace('rfc', '')}"
        sender = RetryingSender(env.postfix.smtp_port, lambda n: aligned_message(env, tag, n),
                                lambda n: ALIGNMENT_KINDS[n % 3][0], threads=6)
        with steady_stream(sender, 6, wait=90) as numbers:
            sender.wait_accepted(15, timeout=30)
            env.dns.stop()  # down: nothing listens
            try:
                time.sleep(3)
            finally:
                env.dns.start()
            sender.wait_accepted(len(sender.accepted) + 15, timeout=60)
            env.dns.delay = DNS_LIFETIME * 3  # frozen: every query times out
            try:
                time.sleep(4)
            finally:
                env.dns.delay = 0.0
            sender.wait_accepted(len(sender.accepted) + 15, timeout=60)
    finally:
        env.dns.delay = 0.0
        env.dns.load(normal_zone(env.keys))
        milter.stop()
    assert not sender.permfails, sender.permfails[:5]
    assert sender.tempfails, "no transaction met the outage"
    total = next(numbers)
    counts = wait_sink(env, tag, total, timeout=60)
    assert sorted(counts) == list(range(total))
    assert all(c == 1 for c in counts.values()), {n: c for n, c in counts.items() if c != 1}
    for raw in env.postfix.messages():
        if f"Subject: {tag} ".encode() in raw:
            head = re.sub(r"\r\n[ \t]+", " ", raw.split(b"\r\n\r\n", 1)[0].decode())
            found = re.search(r"dmarc=(\w+)", our_results(head))
            assert found and found.group(1) in ("pass", "temperror"), head
    kinds = Counter(reply.split(" ", 2)[1] for *_, reply in sender.tempfails
                    if reply[:1] == "4")
    print(f"\n{mode}: {total} messages through a stopped and a frozen DNS server: "
          f"{len(sender.tempfails)} tempfailed attempts {dict(kinds)}, 0 refused, each "
          "delivered once")


# ---- kill -9 and restart under load -----------------------------------------------------------


def burst_message(tag: str) -> Callable[[int], bytes]:
    """Message `number` of a run: From a subdomain of its own (DMARC finds burst.test's
    policy for it and records the evaluation under that From domain), SPF-aligned."""
    return lambda number: message(f"m{number}.burst.test", f"{tag} {number}")


def burst_config(env: Env) -> dict[str, Any]:
    return {"dmarc": {"store": str(env.workdir / "dmarc.db")}}


def test_sigkill_mid_burst_then_restart_delivers_each_message_exactly_once(env: Env) -> None:
    total, kill_at, senders = 500, 150, 10
    store = env.workdir / "dmarc.db"
    milter = env.milter("kill", burst_config(env))
    milter.start()
    sender = RetryingSender(env.postfix.smtp_port, burst_message("burst"), "bounce@burst.test",
                            threads=senders)
    try:
        started = time.monotonic()
        sender.send(range(total))
        sender.wait_accepted(kill_at, timeout=60)
        milter.kill_group()
        killed = time.monotonic()
        accepted_at_kill = len(sender.accepted)
        time.sleep(0.5)  # the senders meet Postfix's tempfail meanwhile
        milter.start()
        restarted = time.monotonic()
        sender.wait(timeout=120)
        finished = time.monotonic()
    finally:
        sender.close()
    counts = wait_sink(env, "burst", total, timeout=60)
    milter.stop()
    assert not sender.permfails, sender.permfails[:5]
    assert sorted(counts) == list(range(total)), sorted(set(range(total)) - set(counts))[:10]
    twice = {n: c for n, c in counts.items() if c != 1}
    assert not twice, f"delivered more than once: {twice}"
    # the kill did land in the middle of the burst: clients were tempfailed and retried
    assert sender.tempfails, "no transaction was tempfailed: the kill missed the burst"
    assert all(reply.startswith(("451 4.7.1", "421", "connection lost"))
               for *_, reply in sender.tempfails), {r for *_, r in sender.tempfails}
    assert all(end >= killed - 0.1 and start <= restarted + 0.1
               for start, end, _, _ in sender.tempfails)
    retried = sum(1 for attempts in sender.accepted.values() if attempts > 1)
    # The store: intact, and every delivered message's evaluation is in it. An evaluation is
    # committed before the verdict goes back to Postfix, so a message whose verdict the kill
    # cut off is evaluated (and recorded) again when its sender retries: at most one extra
    # row per transaction in progress at the kill, i.e. per sender.
    rows = store_rows(store)
    per_message = Counter({int(domain[1:].split(".")[0]): n for domain, n in rows.items()
                           if domain.endswith(".burst.test")})
    assert set(per_message) == set(range(total)), sorted(set(range(total)) - set(per_message))
    extra = sum(per_message.values()) - total
    assert 0 <= extra <= senders, f"{extra} extra evaluation rows"
    print(f"\nkill -9 after {accepted_at_kill} accepted ({killed - started:.2f} s); restarted "
          f"after {restarted - killed:.2f} s; all {total} accepted after {finished - started:.2f}"
          f" s; {len(sender.tempfails)} tempfails, {retried} messages retried, "
          f"{extra} extra store rows")


@pytest.mark.parametrize("transport", ["libmilter", "native"])
def test_reloads_and_a_restart_under_load_fail_no_transaction(env: Env, transport: str) -> None:
    milter = env.milter(f"reload-{transport}", {**burst_config(env), "transport": transport})
    milter.start()
    tag = f"flow{transport}"
    sender = RetryingSender(env.postfix.smtp_port, burst_message(tag), "bounce@burst.test",
                            threads=6)
    reloads = 0
    with steady_stream(sender, 6, wait=60) as numbers:
        sender.wait_accepted(20, timeout=30)
        # reloads, the configuration changing each time (the SPF header alternates)
        for header in ("both", "auth", "spf", "auth"):
            changed = rules()
            changed["mail"][0]["header"] = header
            milter.write_config(dict(milter.config, rules=changed))
            seen = len(sender.accepted)
            milter.signal(signal.SIGHUP)
            reloads += 1
            milter.wait_for_log("configuration reloaded", count=reloads)
            sender.wait_accepted(seen + 15, timeout=30)  # traffic went on meanwhile
        reload_phase_end = time.monotonic()
        assert not sender.tempfails and not sender.permfails, (sender.tempfails[:3],
                                                               sender.permfails[:3])
        # a restart: SIGTERM drains the transactions in progress, then a new daemon starts
        in_reload_phase = len(sender.accepted)
        stopping = time.monotonic()
        assert milter.stop() == 0
        stopped = time.monotonic()
        milter.start()
        restarted = time.monotonic()
        seen = len(sender.accepted)
        sender.wait_accepted(seen + 30, timeout=30)
        milter.signal(signal.SIGHUP)  # and a reload of the new daemon
        milter.wait_for_log("configuration reloaded", count=reloads + 1)
        sender.wait_accepted(len(sender.accepted) + 15, timeout=30)
    total = next(numbers)  # every number handed out so far
    counts = wait_sink(env, tag, total, timeout=60)
    milter.stop()
    assert not sender.permfails, sender.permfails[:5]
    assert sorted(counts) == list(range(total))
    assert all(c == 1 for c in counts.values()), {n: c for n, c in counts.items() if c != 1}
    # only the attempts that met the downtime (listener closed .. new daemon accepting) were
    # tempfailed; the ones in progress at the SIGTERM were drained and answered
    late = [(round(s - stopping, 3), round(e - stopping, 3), r)
            for s, e, _, r in sender.tempfails
            if not (e >= stopping and s <= restarted) or s < reload_phase_end]
    assert not late, late
    log = milter.log()
    for trouble in ("reload refused", "reload failed", "did not finish in time",
                    "still open after", "internal error", "Traceback"):
        assert trouble not in log, trouble
    print(f"\n{in_reload_phase} accepted across {reloads} reloads with no 4xx/5xx; restart: "
          f"drained and stopped in {stopped - stopping:.2f} s, accepting again "
          f"{restarted - stopping:.2f} s after the SIGTERM; {len(sender.tempfails)} attempts "
          f"tempfailed in that window; {total} messages, each delivered once")


# ---- full and read-only file systems ----------------------------------------------------------


class MountNamespace:
    """A private mount namespace, held open by a `sleep` started in it: mounts made in it
    (through nsenter) are seen by the processes run in it and by nobody else, and vanish with
    it. The test reaches its files through /proc/PID/root."""

    def __init__(self) -> None:
        if not (shutil.which("unshare") and shutil.which("nsenter")):
            pytest.skip("needs unshare(1) and nsenter(1) (util-linux)")
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sleep", "600"],
            start_new_session=True, stderr=subprocess.PIPE)
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while self.holder.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != ours:
                    return
            time.sleep(0.01)
        self.close()
        assert self.holder.stderr is not None
        pytest.skip(f"cannot make a mount namespace here: {self.holder.stderr.read()!r}")

    @property
    def enter(self) -> tuple[str, ...]:
        return ("nsenter", "-t", str(self.holder.pid), "-m", "--")

    def run(self, *command: str | Path) -> None:
        subprocess.run([*self.enter, *map(str, command)], check=True, capture_output=True,
                       timeout=30)

    def path(self, path: Path) -> Path:
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)
        if self.holder.stderr is not None:
            self.holder.stderr.close()


def _remount(ns: MountNamespace, path: Path, mode: str) -> None:
    """Make the bind mount at `path` read-only or writable; EBUSY while a file in it is still
    open for writing (a spool file the milter is closing): try again."""
    for _ in range(50):
        try:
            ns.run("mount", "-o", f"remount,bind,{mode}", path)
            return
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    ns.run("mount", "-o", f"remount,bind,{mode}", path)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_spool_and_store_cost_no_verdict(env: Env, fault: str) -> None:
    ns = MountNamespace()
    try:
        _disk_fault(env, ns, fault)
    finally:
        ns.close()


def _disk_fault(env: Env, ns: MountNamespace, fault: str) -> None:
    base = env.workdir / f"fs-{fault}"
    if fault == "full":  # one small tmpfs for both; filled after the first message
        ns.run("mkdir", "-p", base)
        ns.run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", base)
        spool, store_dir = base / "spool", base / "store"
        ns.run("mkdir", spool, store_dir)
    else:  # the store read-only from the start, the spool after the first message
        spool, store_dir = base / "spool", base / "store"
        spool.mkdir(parents=True)
        store_dir.mkdir()
        from mailwarden.dmarc.store import Store

        Store.open(str(store_dir / "dmarc.db")).close()
        for path in (spool, store_dir):
            ns.run("mount", "--bind", path, path)
        _remount(ns, store_dir, "ro")
    store = store_dir / "dmarc.db"
    # one worker: it finds $TMPDIR usable when it first spools, as Python's tempfile (which
    # otherwise silently falls back to /tmp) caches the directory it picks then
    milter = env.milter(f"disk-{fault}", {"workers": 1, "spool_threshold": 4096,
                                          "dmarc": {"store": str(store)}},
                        prefix=ns.enter, env={"TMPDIR": str(spool)})
    milter.start()
    key = env.keys["disk.test"]
    big = "\r\n".join(f"line {n:05d} of a body past the spool threshold" for n in range(500))

    def send(subject: str, from_domain: str = "disk.test") -> Timed:
        data = message(from_domain, subject, big, key if from_domain == "disk.test" else None)
        return transact(env.postfix.smtp_port, "127.0.0.40", "x@disk.test", data)

    def passes(subject: str) -> None:
        timed = send(subject)
        assert timed.final[:2] == ("eom", 250), timed.replies
        results = our_results(delivered(env, subject))
        # dkim=pass: the body read back for the hash is whole, wherever it was kept
        assert "dkim=pass" in results and "dmarc=pass" in results, results

    try:
        passes(f"{fault} 1")
        if fault == "full":
            filler = ns.path(base / "filler")
            # suppress() outermost: closing the file flushes what the full disk refused
            with contextlib.suppress(OSError), filler.open("wb") as out:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            assert os.statvfs(ns.path(base)).f_bavail == 0
        else:
            _remount(ns, spool, "ro")
        passes(f"{fault} 2")
        passes(f"{fault} 3")
        refused = send(f"{fault} refused", from_domain="strict.test")  # DMARC p=reject
        assert refused.final[:2] == ("eom", 550) and refused.final[2].startswith("5.7.1 ")
        # the file system recovers
        if fault == "full":
            filler.unlink()
        else:
            _remount(ns, spool, "rw")
        passes(f"{fault} 4")
        assert milter.process is not None and milter.process.poll() is None, "it crashed"
        log = milter.log()
        cause = "No space left on device" if fault == "full" else "Read-only file system"
        spool_failures = re.findall(rf"cannot spool message bodies to {spool} \((.*?)\)", log)
        assert spool_failures == [cause], log
        # the recovery is logged when the spooled body of the last message is let go
        log = milter.wait_for_log(f"spooling message bodies to {spool} works again (3 bodies "
                                  "were kept in memory meanwhile)")
        if fault == "full":
            store_failures = re.findall(r"DMARC store \S+ cannot be written \((.*?)\)", log)
            assert store_failures == ["database or disk is full; file system full"], log
            assert "recording again; 3 evaluation(s) were not recorded" in log, log
        else:
            # once by the master at the start, which goes on, and once by the worker
            store_failures = re.findall(r"DMARC store \S+ cannot be opened(?: now)? \((.*?)\)",
                                        log)
            assert store_failures == ["unable to open database file; read-only file system"] * 2
            assert len(re.findall(r"cannot be opened now .*: the daemon starts anyway", log)) \
                == 1, log
        for trouble in ("Traceback", "internal error", "worker failed", "ended unexpectedly"):
            assert trouble not in log, log
    finally:
        milter.stop()
    # intact, and what was recorded is there (the read-only store is read where it is
    # writable: SQLite cannot open a WAL database in a read-only directory)
    rows = store_rows(store, ns.enter if fault == "full" else ())
    assert rows == (Counter({"disk.test": 2}) if fault == "full" else Counter()), rows
    print(f"\n{fault}: verdicts unchanged; logged once: spool {spool_failures}, "
          f"store {store_failures}")
