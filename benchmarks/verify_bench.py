"""The inbound verify stack: mailwarden (SPF + DKIM verify + DMARC) against OpenDKIM -> OpenDMARC.

Both stacks write Authentication-Results as mx.bench.example for the same DKIM-signed (RSA-2048)
messages sent from 192.0.2.10 (in the domain's SPF record) by alice@bench.example, whose domain
publishes p=reject:

  mailwarden  one daemon (the default 2 workers per core, unix socket): rules
              mail: spf (header: auth; on fail: continue, so only DMARC refuses, as in the
              reference), eom: dkim_verify, dmarc (enforce). No DMARC report store (`store`
              unset: evaluations are not recorded), like OpenDMARC without a HistoryFile.
  reference   Debian's OpenDKIM 2.11 (Mode v, AuthservID mx.bench.example) chained with
              Debian's OpenDMARC 1.4.2 (SPFSelfValidate + SPFIgnoreResults: it does SPF itself
              through libspf2; TrustedAuthservIDs mx.bench.example: it believes OpenDKIM's
              dkim= result; RejectFailures). As an MTA chains smtpd_milters: each message goes
              through OpenDKIM, its modifications are applied (MilterResult.apply), and the
              result goes through OpenDMARC. A "connection" is one connection to each milter.

All three milters resolve from one loopback DNS server (mailwarden.devtools.devdns, its own
process) on port 53 of a random 127.53.x.y address, because OpenDMARC can only use
/etc/resolv.conf: it runs in a private mount namespace with its own resolv.conf bind-mounted (see
tests/integration/opendmarc.py); mailwarden uses `nameservers: [ADDR:53]`, OpenDKIM
`Nameservers ADDR@53`. mailwarden and OpenDKIM (libunbound) cache answers; OpenDMARC (libresolv)
does not and asks 2 queries per message, whose cost lands in the DNS server: its CPU per message
is shown apart (a local caching resolver would answer these far more cheaply in production).

The MTA side is this file's driver built on benchmarks/milterload.py's sans-I/O MilterSession:
one selector loop, the same for both stacks, one persistent milter connection per lane and
milter (one SMTP session, messages back to back). Latency of the reference is the sum of its
two milters' latencies; throughput is over the whole chain. CPU ms/msg is the user+system time
of the milter processes (mailwarden: master and workers; reference: OpenDKIM + OpenDMARC) over
the measured window divided by the messages finished in it; "DNS ms/msg" is the DNS server's;
"driver" is the load driver's CPU and "other" that of everything else on the machine (from
/proc/stat), in cores: a run with more than a quarter of a core of other work is flagged, since
its numbers are disturbed.

Every finished message is checked: the final action must be accept/continue, and the
Authentication-Results written by the stack (authserv-id mx.bench.example) must say spf=pass
(smtp.mailfrom), dkim=pass and dmarc=pass for bench.example, and nothing else failing. Mismatches
are counted per case and printed; before the load, a forged message (tampered body, sent from an
address outside SPF) must be refused by both. Any mismatch ends the run with a banner and exit
status 2.

Run:  .venv/bin/python benchmarks/verify_bench.py [--seconds 3] [--connections 1 8 32]
                                                 [--sizes 4 100]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import selectors
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "integration"),
                str(ROOT / "tests")]

from daemon import Daemon  # noqa: E402
from dkim_bench import DOMAIN, children, key, start_dns  # noqa: E402
from miltercodec import MilterProtocolError, PacketReader, connect_socket  # noqa: E402
from milterload import Message, MilterClient, MilterResult, MilterSession, make_message  # noqa: E402
from opendkim import OpenDKIM, opendkim_available  # noqa: E402
from opendmarc import OpenDMARC, loopback_dns_host, namespace_problem, opendmarc_available  # noqa: E402

from mailwarden.dkim.keys import SigningKey  # noqa: E402
from mailwarden.dkim.sign import sign_message  # noqa: E402

AUTHSERV = "mx.bench.example"
CLIENT_IP = "192.0.2.10"  # inside the SPF record
FORGED_IP = "198.51.100.7"  # outside it
HELO = f"client.{DOMAIN}"
MAIL_FROM = f"alice@{DOMAIN}"
RCPT = "bob@example.net"
VARIANTS = 4  # distinct messages per size, sent round-robin
CLK_TCK = os.sysconf("SC_CLK_TCK")
OK_ACTIONS = ("accept", "continue")
BUSY_WARNING = 0.25  # cores used by other processes during a run before it is flagged


# ---- the per-message check -------------------------------------------------------------------


def _unfold(value: str) -> str:
    text = re.sub(r"\s+", " ", value)
    while True:  # drop RFC 5322 comments (non-nested here), e.g. "(2048-bit key; unprotected)"
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def auth_results(results: Sequence[MilterResult]) -> list[str]:
    """The Authentication-Results values the stack added, in the order they were written."""
    return [value for r in results for name, value in r.headers_added
            if name.lower() == "authentication-results"]


def check_pass(results: Sequence[MilterResult]) -> str | None:
    """None if the stack accepted the message with spf, dkim and dmarc all pass for DOMAIN;
    otherwise what is wrong."""
    if not results:
        return "no result"
    final = results[-1]
    if final.action not in OK_ACTIONS:
        return f"action {final.action} at {final.stage} ({final.reply})"
    fields = auth_results(results)
    if not fields:
        return "no Authentication-Results"
    seen: dict[str, list[str]] = {"spf": [], "dkim": [], "dmarc": []}
    problems: list[str] = []
    for value in fields:
        parts = [p.strip() for p in _unfold(value).split(";")]
        if parts[0].split()[0:1] != [AUTHSERV]:
            problems.append(f"authserv-id {parts[0]!r}")
        for resinfo in parts[1:]:
            method, _, rest = resinfo.partition("=")
            method = method.strip().lower()
            words = rest.split()
            if not words or method not in seen:
                continue  # dkim-atps=, empty "none" fields
            result, props = words[0].lower(), " ".join(words[1:]).lower()
            if method == "spf" and "smtp.helo=" in props:
                continue  # mailwarden also reports the HELO identity; not compared
            seen[method].append(result)
            wanted = {"spf": "smtp.mailfrom=", "dkim": f"header.d={DOMAIN}",
                      "dmarc": f"header.from={DOMAIN}"}[method]
            if result != "pass" or wanted not in props:
                problems.append(f"{method}={result} {props}")
    problems += [f"no {method}= result" for method, got in seen.items() if not got]
    return "; ".join(problems) or None


class Checker:
    """check_pass with a bounded cache: a stack answers the same message the same way."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], str | None] = {}

    def __call__(self, results: Sequence[MilterResult]) -> str | None:
        cache_key = tuple((r.action, r.stage, r.reply, tuple(r.headers_added)) for r in results)
        if cache_key in self._cache:
            return self._cache[cache_key]
        verdict = check_pass(results)
        if len(self._cache) < 4096:
            self._cache[cache_key] = verdict
        return verdict


# ---- the chained load driver ----------------------------------------------------------------


class _Hop:
    """One milter connection of a lane (blocking negotiation, then non-blocking)."""

    def __init__(self, spec: str, timeout: float) -> None:
        self.spec = spec
        self.sock = connect_socket(spec, timeout)
        self.session = MilterSession(mta_name=AUTHSERV, daemon_name="verify_bench")
        self.reader = PacketReader()
        self.out = bytearray()
        self.writing = False
        gen = self.session.negotiate_gen()
        try:
            data = next(gen)
            while True:
                self.sock.sendall(data)
                data = gen.send(self._read_blocking())
        except StopIteration:
            pass
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _read_blocking(self) -> tuple[bytes, bytes]:
        while True:
            packet = self.reader.pop()
            if packet is not None:
                return packet
            data = self.sock.recv(65536)
            if not data:
                raise MilterProtocolError("the milter closed the connection")
            self.reader.feed(data)


class _Lane:
    """A chain of milter connections (one per milter), working on one message at a time."""

    def __init__(self, specs: Sequence[str], timeout: float) -> None:
        self.hops: list[_Hop] = []
        try:
            for spec in specs:
                self.hops.append(_Hop(spec, timeout))
        except BaseException:
            self.close(quit=False)
            raise
        self.stage = 0
        self.gen: Any = None
        self.message: Message | None = None
        self.results: list[MilterResult] = []
        self.stage_start = 0.0
        self.waiting_since = 0.0
        self.latency = 0.0

    def close(self, quit: bool) -> None:
        for hop in self.hops:
            if quit:
                with contextlib.suppress(OSError):
                    hop.sock.setblocking(True)
                    hop.sock.settimeout(1)
                    hop.sock.sendall(bytes(hop.out) + hop.session.quit_bytes())
            hop.sock.close()


@dataclass
class ChainStats:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    mismatches: int = 0
    mismatch_samples: list[str] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)


def _chain_loop(specs: Sequence[str], messages: Sequence[Message], lanes_wanted: int,
                start: float, measure_from: float, deadline: float, timeout: float,
                offset: int) -> ChainStats:
    """Keep `lanes_wanted` lanes busy until `deadline`; check and time every message."""
    stats = ChainStats()
    sel = selectors.DefaultSelector()
    lanes: set[_Lane] = set()
    retry_at: list[float] = []
    forwarded: dict[tuple[int, tuple[Any, ...]], Message] = {}
    check = Checker()
    counter = offset

    def error(text: str) -> None:
        stats.errors += 1
        if len(stats.error_samples) < 5:
            stats.error_samples.append(text)

    def next_message() -> Message:
        nonlocal counter
        counter += 1
        return messages[counter % len(messages)]

    def open_lane() -> None:
        try:
            lane = _Lane(specs, timeout)
        except (OSError, MilterProtocolError) as exc:
            error(f"connect: {exc}")
            retry_at.append(time.perf_counter() + 0.05)
            return
        lanes.add(lane)
        for hop in lane.hops:
            sel.register(hop.sock, selectors.EVENT_READ, (lane, hop))
        begin(lane, next_message())

    def drop(lane: _Lane, text: str) -> None:
        error(text)
        close(lane, quit=False)
        if time.perf_counter() < deadline:
            retry_at.append(time.perf_counter() + 0.05)

    def close(lane: _Lane, quit: bool) -> None:
        if lane not in lanes:
            return
        lanes.discard(lane)
        for hop in lane.hops:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(hop.sock)
        lane.close(quit)

    def begin(lane: _Lane, message: Message) -> None:
        lane.results = []
        lane.latency = 0.0
        start_stage(lane, 0, message)

    def start_stage(lane: _Lane, stage: int, message: Message) -> None:
        lane.stage, lane.message = stage, message
        lane.stage_start = time.perf_counter()
        lane.gen = lane.hops[stage].session.message_gen(message)
        advance(lane, None)

    def forward(message: Message, result: MilterResult) -> Message:
        """The message as the MTA passes it to the next milter (header changes applied)."""
        cache_key = (id(message), tuple(result.modifications))
        found = forwarded.get(cache_key)
        if found is None:
            found = Message(result.apply(message.data), message.mail_from, message.rcpts,
                            message.client_ip, message.helo, message.macros)
            if len(forwarded) < 4096:
                forwarded[cache_key] = found
        return found

    def finished(lane: _Lane, now: float) -> None:
        if measure_from <= now <= deadline:
            stats.latencies.append(lane.latency)
            stats.actions[lane.results[-1].action] += 1
            problem = check(lane.results)
            if problem is not None:
                stats.mismatches += 1
                if len(stats.mismatch_samples) < 5:
                    stats.mismatch_samples.append(
                        f"{problem} | "
                        + " | ".join(re.sub(r"\s+", " ", v) for v in auth_results(lane.results)))
        if now >= deadline:
            close(lane, quit=True)
        else:
            begin(lane, next_message())

    def advance(lane: _Lane, packet: tuple[bytes, bytes] | None) -> None:
        hop = lane.hops[lane.stage]
        try:
            data = next(lane.gen) if packet is None else lane.gen.send(packet)
        except StopIteration as stop:
            now = time.perf_counter()
            result: MilterResult = stop.value
            result.latency = now - lane.stage_start
            lane.latency += result.latency
            lane.results.append(result)
            assert lane.message is not None
            if result.action in OK_ACTIONS and lane.stage + 1 < len(lane.hops):
                start_stage(lane, lane.stage + 1, forward(lane.message, result))
            else:
                finished(lane, now)
            return
        except MilterProtocolError as exc:
            drop(lane, str(exc))
            return
        hop.out += data
        lane.waiting_since = time.perf_counter()
        flush(lane, hop)

    def flush(lane: _Lane, hop: _Hop) -> None:
        if not hop.out:
            return
        try:
            sent = hop.sock.send(hop.out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            drop(lane, f"send: {exc}")
            return
        del hop.out[:sent]
        writing = bool(hop.out)
        if writing != hop.writing:
            hop.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            with contextlib.suppress(KeyError, ValueError):
                sel.modify(hop.sock, events, (lane, hop))

    now = time.perf_counter()
    if start > now:
        time.sleep(start - now)
    for _ in range(lanes_wanted):
        open_lane()
    last_check = time.perf_counter()
    while lanes or (retry_at and time.perf_counter() < deadline):
        now = time.perf_counter()
        due = [t for t in retry_at if t <= now]
        for t in due:
            retry_at.remove(t)
            if now < deadline:
                open_lane()
        if now > deadline + timeout:
            for lane in list(lanes):
                close(lane, quit=False)
            break
        for sel_key, mask in sel.select(timeout=0.05):
            lane, hop = sel_key.data
            if lane not in lanes:
                continue
            if mask & selectors.EVENT_WRITE:
                flush(lane, hop)
            if not mask & selectors.EVENT_READ or lane not in lanes:
                continue
            try:
                data = hop.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as exc:
                drop(lane, f"recv: {exc}")
                continue
            if not data:
                drop(lane, "the milter closed the connection")
                continue
            hop.reader.feed(data)
            while lane in lanes and hop is lane.hops[lane.stage]:
                try:
                    packet = hop.reader.pop()
                except MilterProtocolError as exc:
                    drop(lane, str(exc))
                    break
                if packet is None:
                    break
                advance(lane, packet)
        if now - last_check > 0.5:
            last_check = now
            for lane in list(lanes):
                if now - lane.waiting_since > timeout:
                    drop(lane, f"no reply within {timeout} s")
    sel.close()
    return stats


def _worker(conn: Any, args: tuple[Any, ...]) -> None:
    try:
        conn.send(_chain_loop(*args))
    except BaseException as exc:
        conn.send(exc)
    finally:
        conn.close()


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle so far (/proc/stat, steal included)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Measurement:
    messages: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    milter_cpu_ms: list[float]  # per message, per milter group
    dns_cpu_ms: float
    driver_share: float  # CPU of the load driver, in cores
    other_share: float  # CPU of everything else on the machine (other jobs, kernel), in cores
    errors: int
    mismatches: int
    error_samples: list[str]
    mismatch_samples: list[str]
    actions: dict[str, int]


def run_chain(specs: Sequence[str], messages: Sequence[Message], *, connections: int,
              seconds: float, warmup: float, milter_pids: Sequence[Callable[[], list[int]]],
              dns_pid: int, processes: int = 1, timeout: float = 30.0) -> Measurement:
    """Drive `connections` lanes through the milters `specs` (in chain order) for `seconds`
    after `warmup`, in `processes` forked driver processes; sample the CPU of each group of
    `milter_pids` and of the DNS server over the measured window."""
    for message in messages:
        message.parsed()
    processes = max(1, min(processes, connections))
    start = time.perf_counter() + 0.2
    measure_from = start + warmup
    deadline = measure_from + seconds
    ctx = multiprocessing.get_context("fork")
    workers = []
    for index in range(processes):
        share = connections // processes + (1 if index < connections % processes else 0)
        parent_end, child_end = ctx.Pipe(duplex=False)
        args = (specs, messages, share, start, measure_from, deadline, timeout, index * 7)
        proc = ctx.Process(target=_worker, args=(child_end, args), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    drivers = [proc.pid for proc, _ in workers if proc.pid is not None]
    time.sleep(max(0.0, measure_from - time.perf_counter()))
    groups = [get() for get in milter_pids]
    ours = [*groups, [dns_pid], drivers]
    before = [cpu_seconds(pids) for pids in ours]
    busy_before = busy_seconds()
    time.sleep(max(0.0, deadline - time.perf_counter()))
    after = [cpu_seconds(pids) for pids in ours]
    busy_after = busy_seconds()
    stats: list[ChainStats] = []
    for proc, parent_end in workers:
        try:
            got = parent_end.recv()
        except EOFError:
            got = RuntimeError(f"driver process {proc.pid} died (exit {proc.exitcode})")
        proc.join(10)
        if isinstance(got, BaseException):
            raise RuntimeError(f"driver failed: {got!r}") from got
        stats.append(got)
    latencies = sorted(x for s in stats for x in s.latencies)
    count = len(latencies)
    actions: Counter[str] = Counter()
    for s in stats:
        actions.update(s.actions)

    def pct(q: float) -> float:
        return latencies[min(count - 1, round(q * (count - 1)))] * 1000 if count else 0.0

    per = max(count, 1)
    used = [a - b for a, b in zip(after, before, strict=True)]
    return Measurement(
        messages=count, seconds=seconds, per_second=count / seconds, p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        milter_cpu_ms=[x * 1000 / per for x in used[:-2]],
        dns_cpu_ms=used[-2] * 1000 / per,
        driver_share=used[-1] / seconds,
        other_share=max(0.0, busy_after - busy_before - sum(used)) / seconds,
        errors=sum(s.errors for s in stats), mismatches=sum(s.mismatches for s in stats),
        error_samples=[x for s in stats for x in s.error_samples][:5],
        mismatch_samples=[x for s in stats for x in s.mismatch_samples][:5],
        actions=dict(actions))


# ---- the stacks --------------------------------------------------------------------------------


TRANSPORTS = ("libmilter", "native")


def start_mailwarden(workdir: Path, dns_host: str, transport: str) -> Daemon:
    config = {
        "transport": transport,
        "listen": f"unix:{workdir}/mailwarden.sock", "authserv_id": AUTHSERV,
        "log_level": "warning", "drain_timeout": 2,  # workers: the default, 2 per core
        "dns": {"nameservers": [f"{dns_host}:53"], "timeout": 2.0},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "auth",
                      "on": {"fail": "continue"}}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc", "enforce": True}],
        },
    }  # no dmarc.store: evaluations are not recorded
    daemon = Daemon(workdir, config)
    daemon.start()
    return daemon


def signed_messages(size: int, rsa: SigningKey) -> list[Message]:
    out = []
    for seq in range(VARIANTS):
        body = make_message(size, from_addr=MAIL_FROM, subject="verify bench", seq=seq)
        fields = sign_message(body, [rsa])
        data = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                        for n, v in fields) + body
        out.append(Message(data, mail_from=MAIL_FROM, rcpts=(RCPT,), client_ip=CLIENT_IP,
                           helo=HELO))
    return out


def through(specs: Sequence[str], message: Message) -> list[MilterResult]:
    """One message through the chain with blocking clients (the pre-flight check)."""
    results: list[MilterResult] = []
    data = message.data
    for spec in specs:
        with MilterClient(spec, timeout=15, mta_name=AUTHSERV) as client:
            result = client.send_message(client_ip=message.client_ip, helo=message.helo,
                                         mail_from=message.mail_from, rcpts=message.rcpts,
                                         message=data)
        results.append(result)
        if result.action not in OK_ACTIONS:
            break
        data = result.apply(data)
    return results


def preflight(stacks: dict[str, list[str]], good: Message) -> list[str]:
    """Problems found sending one good and one forged message through each stack."""
    problems = []
    forged = Message(good.data.replace(b"quick brown fox", b"quick brown cat", 1),
                     mail_from=good.mail_from, rcpts=good.rcpts, client_ip=FORGED_IP,
                     helo=good.helo)
    for name, specs in stacks.items():
        results = through(specs, good)
        problem = check_pass(results)
        print(f"  {name:<10} good message:   {results[-1].action}; "
              + " | ".join(_unfold(v) for v in auth_results(results)))
        if problem:
            problems.append(f"{name}: good message: {problem}")
        results = through(specs, forged)
        last = results[-1]
        print(f"  {name:<10} forged message: {last.action} {last.reply or ''}; "
              + " | ".join(_unfold(v) for v in auth_results(results)))
        if last.action != "reject" or not (last.reply or "").startswith("550"):
            problems.append(f"{name}: forged message not refused: {last.action} {last.reply}")
    return problems


# ---- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 100],
                        help="message sizes in KiB")
    parser.add_argument("--processes", type=int, default=1,
                        help="driver processes sharing the connections (both stacks alike)")
    args = parser.parse_args()
    if not opendkim_available():
        raise SystemExit("OpenDKIM is not installed (apt-get install opendkim)")
    if not opendmarc_available():
        raise SystemExit("OpenDMARC is not installed (apt-get install opendmarc)")
    problem = namespace_problem()
    if problem:
        raise SystemExit(f"OpenDMARC cannot be pointed at the loopback DNS server: {problem}")
    workdir = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    os.chmod(workdir, 0o755)
    rsa = key(workdir, "rsa", "rsa")
    spf = "v=spf1 ip4:192.0.2.0/24 -all"
    zone = {rsa.dns_name: [{"TXT": rsa.public_record}], DOMAIN: [{"TXT": spf}],
            HELO: [{"TXT": spf}], f"_dmarc.{DOMAIN}": [{"TXT": "v=DMARC1; p=reject"}]}
    dns_host = loopback_dns_host()
    dns, _ = start_dns(zone, workdir, dns_host, 53)
    daemons: dict[str, Daemon] = {}
    odk = OpenDKIM(workdir / "opendkim", mode="v", dns=(dns_host, 53), log=False,
                   extra_conf={"AuthservID": AUTHSERV})
    odm = OpenDMARC(workdir / "opendmarc", dns=(dns_host, 53), authserv_id=AUTHSERV,
                    reject_failures=True, log=False)
    rows: list[tuple[int, int, str, Measurement, Measurement]] = []
    failures: list[str] = []
    busy: list[str] = []
    try:
        for transport in TRANSPORTS:
            daemons[transport] = start_mailwarden(workdir / f"mailwarden-{transport}", dns_host,
                                                  transport)
        odk.start()
        odm.start()
        assert odk.pid is not None and odm.pid is not None
        odk_pid, odm_pid = odk.pid, odm.pid
        stacks: dict[str, list[str]] = {}
        pids: dict[str, list[Callable[[], list[int]]]] = {}
        for transport, daemon in daemons.items():
            assert daemon.process is not None
            stacks[f"mw-{transport}"] = [daemon.socket]
            pids[f"mw-{transport}"] = [lambda pid=daemon.process.pid: [pid, *children(pid)]]
        stacks["reference"] = [odk.socket, odm.socket]
        pids["reference"] = [lambda: [odk_pid], lambda: [odm_pid]]
        print(f"DNS: devdns on {dns_host}:53 (pid {dns.pid}); OpenDMARC sees it through a "
              "private resolv.conf")
        print("pre-flight (4 KiB):")
        failures += preflight(stacks, signed_messages(4096, rsa)[0])
        print(f"\n{'stack':<13}{'size':>5}{'conns':>6} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
              f" {'milter CPU ms/msg':>22} {'DNS ms/msg':>10} {'driver':>7} {'other':>6}"
              f" {'errs':>5} {'mismatch':>8}", flush=True)
        for size in args.sizes:
            messages = signed_messages(size * 1024, rsa)
            for connections in args.connections:
                got: dict[str, Measurement] = {}
                for name, specs in stacks.items():
                    m = run_chain(specs, messages, connections=connections,
                                  seconds=args.seconds, warmup=min(1.0, args.seconds / 3),
                                  milter_pids=pids[name], dns_pid=dns.pid,
                                  processes=args.processes)
                    got[name] = m
                    cpu = " + ".join(f"{x:.2f}" for x in m.milter_cpu_ms)
                    if len(m.milter_cpu_ms) > 1:
                        cpu = f"{sum(m.milter_cpu_ms):.2f} ({cpu})"
                    print(f"{name:<13}{size:>4}K{connections:>6} {m.per_second:>8,.0f} "
                          f"{m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {cpu:>22} {m.dns_cpu_ms:>10.3f}"
                          f" {m.driver_share:>6.0%} {m.other_share:>6.0%} {m.errors:>5}"
                          f" {m.mismatches:>8}", flush=True)
                    if m.other_share > BUSY_WARNING:
                        busy.append(f"{name} {size} KiB x{connections}: other processes used "
                                    f"{m.other_share:.0%} of a core")
                        print(f"    WARNING: {busy[-1]} during this run: numbers disturbed")
                    for sample in m.mismatch_samples[:3]:
                        print(f"    MISMATCH: {sample}")
                    for sample in m.error_samples[:3]:
                        print(f"    error: {sample}")
                    if m.mismatches:
                        failures.append(f"{name} {size} KiB x{connections}: {m.mismatches} of "
                                        f"{m.messages} messages with wrong verdicts")
                    if m.messages == 0:
                        failures.append(f"{name} {size} KiB x{connections}: no message "
                                        f"finished ({m.errors} errors)")
                for transport in TRANSPORTS:
                    rows.append((size, connections, transport, got[f"mw-{transport}"],
                                 got["reference"]))
    finally:
        for daemon in daemons.values():
            daemon.stop()
        odk.stop()
        odm.stop()
        dns.terminate()
        dns.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    print("\nmailwarden / reference (OpenDKIM -> OpenDMARC); throughput > 1x is faster, "
          "latency and CPU < 1x are better")
    print(f"{'size':>5}{'conns':>6} {'mw msg/s':>9} {'ref msg/s':>9} {'ratio':>7} "
          f"{'mw p50/p99 ms':>15} {'ref p50/p99 ms':>15} {'p50':>6} {'p99':>6} "
          f"{'mw CPU':>7} {'ref CPU':>7} {'CPU':>6}  transport")
    for size, connections, transport, mw, ref in rows:
        mw_cpu, ref_cpu = sum(mw.milter_cpu_ms), sum(ref.milter_cpu_ms)
        print(f"{size:>4}K{connections:>6} {mw.per_second:>9,.0f} {ref.per_second:>9,.0f} "
              f"{ratio(mw.per_second, ref.per_second):>7} "
              f"{mw.p50_ms:>7.2f}/{mw.p99_ms:<7.2f} {ref.p50_ms:>7.2f}/{ref.p99_ms:<7.2f} "
              f"{ratio(mw.p50_ms, ref.p50_ms):>6} {ratio(mw.p99_ms, ref.p99_ms):>6} "
              f"{mw_cpu:>7.2f} {ref_cpu:>7.2f} {ratio(mw_cpu, ref_cpu):>6}  {transport}")
    measured = {id(m): m for _, _, _, a, b in rows for m in (a, b)}.values()  # ref once
    total = sum(m.mismatches for m in measured)
    checked = sum(m.messages for m in measured)
    print(f"\nverdict mismatches: {total} of {checked} messages checked")
    if busy:
        print(f"WARNING: the machine was busy with other work during {len(busy)} run(s) "
              f"(column 'other'): {'; '.join(busy)}")
    if failures:
        bar = "!" * 78
        print(f"\n{bar}\n!!! WRONG VERDICTS OR FAILED RUNS: these numbers are NOT a valid "
              f"comparison\n{bar}")
        for line in failures:
            print(f"!!! {line}")
        print(bar)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
