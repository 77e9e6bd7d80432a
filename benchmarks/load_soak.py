"""Load and soak: many concurrent SMTP sessions through Postfix with mailwarden's inbound policy.

    asyncio SMTP client (--sessions concurrent sessions, one message per SMTP session, each
    session starting the next as soon as it ends)
      -> Postfix smtpd on loopback (tests/integration/postfix.py, process limits raised so that
         every session gets its own smtpd at once), and for the measured phase mailwarden
         (SPF on MAIL FROM, dkim_verify, DMARC with its SQLite store, Authentication-Results)
      -> Postfix's queue manager and smtp client
      -> smtp-sink (Postfix's counting test server, storing nothing)

The pieces are benchmarks/postfix_bench.py's: the pre-signed message (RSA-2048, published in a
loopback mailwarden.devtools.devdns), the SPF and DMARC records (every verdict is pass), the
counting sink, the check of delivered samples (Authentication-Results spf=pass dkim=pass
dmarc=pass).

The run has two phases, with Postfix started afresh for each:

1. baseline: no milter, --baseline seconds (a short warm-up first, not counted);
2. mailwarden: the daemon started (as the `mailwarden` user when that account exists and we are
   root, as in production; otherwise `user: root`), a sample of messages relayed to a storing
   sink whose headers are checked, --warmup seconds of load that are not counted, then
   --duration seconds measured (600 for the soak).

Latency is per message, seen by the client: from the start of the TCP connect to the 250 reply
to the message's final dot (the greeting, EHLO, MAIL, RCPT and DATA round trips included: each
waits on the milter). With a closed loop of N sessions the system is saturated, so latency is
mostly queueing (Little's law: about N / throughput); "added latency" is mailwarden's p50 (p99)
minus the baseline's p50 (p99) at the same concurrency. --rate R paces the sessions to R
messages/s in all instead (an open loop below saturation), where latency is service time.

Errors (must be 0, else exit 1): every 4xx or 5xx reply, every connection failure or timeout,
and every accepted message that did not reach smtp-sink once Postfix's queue is empty.

mailwarden's memory: every --interval seconds the RSS (VmRSS) of the master and its workers,
summed, and their thread count, from /proc. Reported: the peaks, the RSS at the start of the
measured phase (after the warm-up) and at its end, and a verdict: the memory grows if the
median of the last fifth of the samples exceeds the median of the first fifth by more than
--growth-limit percent plus 8 MiB (exit 1). The daemon log is checked for tracebacks.

Run (root; Debian's postfix package):
    .venv/bin/python benchmarks/load_soak.py                          # 500 sessions, 10 min
    .venv/bin/python benchmarks/load_soak.py --duration 60            # a quick run
    .venv/bin/python benchmarks/load_soak.py --sessions 50 --duration 10 --baseline 5 \
        --warmup 3 --interval 1                                        # a smoke run
The last line is the report as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests"))

from daemon import Daemon  # noqa: E402
from dkim_bench import start_dns  # noqa: E402
from postfix import MYHOSTNAME, postfix_available  # noqa: E402
from postfix_bench import (  # noqa: E402
    DMARC_RECORD,
    DOMAIN,
    HELO,
    MEASURED_RCPT,
    SAMPLE_RCPT,
    SELECTOR,
    SENDER,
    SMTP_SINK,
    SPF_RECORD,
    BenchPostfix,
    CaseError,
    CountingSink,
    check_inbound,
    message_files,
    private_dir,
    wait_queue_empty,
)

from mailwarden.config import default_workers  # noqa: E402
from mailwarden.dkim.keys import generate, load_key, write_private  # noqa: E402

SESSION_TIMEOUT = 120.0  # one SMTP session, connect to 221
DRAIN_TIMEOUT = 300.0
MIB = 1024 * 1024


# ---- the SMTP client ---------------------------------------------------------------------------


class SMTPError(Exception):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind  # 4xx | 5xx | connection


@dataclass
class LoadResult:
    sessions: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, accepted messages only
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    peak_open: int = 0
    warmup_accepted: int = 0

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """The nearest-rank percentile, in seconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
        return ordered[rank - 1]

    def add_error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{kind}: {text}")


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply (all its lines); its code and its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection", "the server closed the connection")
        if len(line) < 4 or line[3:4] != b"-":
            text = line.decode("ascii", "replace").rstrip()
            try:
                return int(line[:3]), text
            except ValueError:
                raise SMTPError("connection", f"not an SMTP reply: {text!r}") from None


async def _expect(reader: asyncio.StreamReader, wanted: int, step: str) -> None:
    code, text = await _reply(reader)
    if code != wanted:
        kind = "5xx" if code >= 500 else "4xx" if code >= 400 else "connection"
        raise SMTPError(kind, f"{step}: {text}")


async def smtp_transaction(port: int, message: bytes, rcpt: str) -> float:
    """One SMTP session delivering `message` (CRLF, dot-stuffed, without the final dot);
    the seconds from the connect to the 250 after the final dot."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        raise SMTPError("connection", f"connect: {exc}") from None
    try:
        await _expect(reader, 220, "greeting")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, 250, "EHLO")
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await _expect(reader, 250, "MAIL FROM")
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        await _expect(reader, 250, "RCPT TO")
        writer.write(b"DATA\r\n")
        await _expect(reader, 354, "DATA")
        writer.write(message + b".\r\n")
        await _expect(reader, 250, "end of data")
        latency = time.monotonic() - started
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221, "QUIT")
        return latency
    except OSError as exc:
        raise SMTPError("connection", str(exc) or type(exc).__name__) from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def drive(port: int, message: bytes, sessions: int, seconds: float, rcpt: str,
                rate: float | None = None, warmup: float = 0.0) -> LoadResult:
    """`sessions` concurrent clients, each sending one message per SMTP session for
    `warmup` + `seconds` seconds (a session in progress then finishes); the latencies and the
    throughput are those of the sessions started after the warm-up, every error counts. With
    `rate`, new sessions start at most `rate` times per second in all."""
    result = LoadResult(sessions)
    loop = asyncio.get_running_loop()
    started = loop.time()
    measured_from = started + warmup
    deadline = measured_from + seconds
    open_now = 0
    next_slot = [started]

    async def client(number: int) -> None:
        nonlocal open_now
        # spread the first connects over a few ms: 500 SYNs at once overflow the backlog
        await asyncio.sleep(number * 0.002)
        while loop.time() < deadline:
            if rate:
                slot = next_slot[0] = max(next_slot[0] + 1 / rate, loop.time())
                if slot >= deadline:
                    return
                await asyncio.sleep(slot - loop.time())
            open_now += 1
            result.peak_open = max(result.peak_open, open_now)
            counted = loop.time() >= measured_from
            try:
                latency = await asyncio.wait_for(smtp_transaction(port, message, rcpt),
                                                 SESSION_TIMEOUT)
                if counted:
                    result.latencies.append(latency)
                else:
                    result.warmup_accepted += 1
            except SMTPError as exc:
                result.add_error(exc.kind, str(exc))
            except TimeoutError:
                result.add_error("connection", f"no answer in {SESSION_TIMEOUT:.0f} s")
            finally:
                open_now -= 1

    await asyncio.gather(*(client(n) for n in range(sessions)))
    result.seconds = loop.time() - measured_from
    return result


def smtp_bytes(path: Path) -> bytes:
    """The message as sent in DATA: CRLF line ends, dot-stuffed (postfix_bench writes its
    files with LF line ends, for smtp-source -F)."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)


# ---- mailwarden's processes --------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its live children (the master and its workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


@dataclass
class Sample:
    at: float  # seconds since the start of the measured phase
    rss: int  # bytes, summed
    pss: int  # bytes, summed (shared pages split between the processes sharing them)
    threads: int
    processes: int


def sample(master: int) -> Sample:
    rss = pss = threads = processes = 0
    for pid in process_tree(master):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        threads += int(fields.get("Threads", "0").strip())
        processes += 1
        found = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
        pss += int(found.group(1)) * 1024 if found else 0
    return Sample(0.0, rss, pss, threads, processes)


async def sampler(master: int, interval: float, samples: list[Sample], started: float,
                  stop: asyncio.Event) -> None:
    while True:
        taken = sample(master)
        taken.at = time.monotonic() - started
        samples.append(taken)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
            return  # the load is over: the last sample is the last one taken under load


def growth_verdict(samples: list[Sample], limit_percent: float) -> tuple[bool, str]:
    """(grows, text): the median RSS of the last fifth of the samples against the first."""
    if len(samples) < 2:
        return False, "too few samples to judge"
    fifth = max(1, len(samples) // 5)
    first = statistics.median(s.rss for s in samples[:fifth])
    last = statistics.median(s.rss for s in samples[-fifth:])
    allowed = first * limit_percent / 100 + 8 * MIB
    grows = last - first > allowed
    text = (f"median of the first {fifth} sample(s) {first / MIB:.1f} MiB, of the last "
            f"{fifth} {last / MIB:.1f} MiB ({(last - first) / MIB:+.1f} MiB; allowed "
            f"+{allowed / MIB:.1f} MiB)")
    return grows, ("GROWS: " if grows else "stable: ") + text


# ---- the phases --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def describe(result: LoadResult) -> str:
    return (f"{result.accepted:,} messages in {result.seconds:.0f} s: {result.rate:,.1f} msg/s, "
            f"latency p50 {ms(result.percentile(0.50))}, p99 {ms(result.percentile(0.99))}, "
            f"errors {result.error_count}, peak open sessions {result.peak_open}")


def daemon_user() -> str:
    """`mailwarden` when that account exists (we are root), as in production; else root."""
    try:
        pwd.getpwnam("mailwarden")
    except KeyError:
        return "root"
    return "mailwarden"


def mailwarden_config(socket: str, dns: str, store: Path, user: str) -> dict[str, Any]:
    return {
        "listen": f"unix:{socket}", "socket_mode": "0666", "user": user,
        "authserv_id": MYHOSTNAME, "log_level": "warning", "drain_timeout": 5,
        # workers: not set, the default (2 per core)
        "dns": {"nameservers": [dns], "timeout": 2.0},
        "dmarc": {"store": str(store)},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "auth"}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc", "enforce": True}],
        },
    }


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.sink = CountingSink()
        self.message = b""
        self.presigned = Path()
        self.dns_address = ""
        self.report: dict[str, Any] = {}
        self.failures: list[str] = []

    def postfix(self, name: str, milter: str | None) -> BenchPostfix:
        route = f"inline:{{ {MEASURED_RCPT.partition('@')[2]}=smtp:[127.0.0.1]:{self.sink.port} }}"
        limit = str(self.args.sessions + 50)
        return BenchPostfix(self.workdir / name, milter=milter, extra_main_cf={
            "transport_maps": route,
            # a smtpd per session: smtpd's maxproc is "-" (default_process_limit)
            "default_process_limit": limit,
            # the smtp clients towards smtp-sink: enough to keep the queue short
            "default_destination_concurrency_limit": "100",
        })

    def finish_phase(self, mx: BenchPostfix, sent: int, before: int) -> int:
        """Wait for every accepted message to reach smtp-sink; the number that did not."""
        wait_queue_empty(mx, DRAIN_TIMEOUT)
        self.sink.wait_for(before + sent, 30)
        return before + sent - self.sink.count

    def baseline(self) -> LoadResult:
        args = self.args
        mx = self.postfix("postfix-baseline", None)
        mx.start()
        try:
            before = self.sink.count
            result = asyncio.run(drive(mx.smtp_port, self.message, args.sessions, args.baseline,
                                       MEASURED_RCPT, args.rate, min(5.0, args.baseline / 2)))
            missing = self.finish_phase(mx, result.warmup_accepted + result.accepted, before)
        finally:
            mx.stop()
        if missing:
            result.add_error("undelivered", f"{missing} accepted messages never reached the sink")
        return result

    def with_mailwarden(self) -> tuple[LoadResult, list[Sample], str]:
        args = self.args
        user = daemon_user()
        state = self.workdir / "state"
        state.mkdir(mode=0o750)
        if user != "root":
            entry = pwd.getpwnam(user)
            os.chown(state, entry.pw_uid, entry.pw_gid)
        with private_dir("load-soak-") as socket_dir:
            mx = self.postfix("postfix-mailwarden", f"unix:{socket_dir}/mailwarden.sock")
            daemon = Daemon(self.workdir / "mailwarden", mailwarden_config(
                f"{socket_dir}/mailwarden.sock", self.dns_address, state / "dmarc.db", user))
            samples: list[Sample] = []
            daemon.start()
            try:
                mx.start()
                try:
                    assert daemon.process is not None
                    master = daemon.process.pid
                    before = self.sink.count
                    stored = len(mx.messages())
                    for _ in range(args.sample):
                        try:
                            asyncio.run(smtp_transaction(mx.smtp_port, self.message,
                                                         SAMPLE_RCPT))
                        except SMTPError as exc:
                            raise CaseError(f"a sampled message failed: {exc}") from None
                    note = check_inbound(mx.wait_for_messages(stored + args.sample, 60)[stored:])
                    result = asyncio.run(self.measured(mx.smtp_port, master, samples))
                    missing = self.finish_phase(mx, result.warmup_accepted + result.accepted,
                                                before)
                finally:
                    mx.stop()
            finally:
                daemon.stop()
        if missing:
            result.add_error("undelivered", f"{missing} accepted messages never reached the sink")
        bad = [line for line in daemon.log().splitlines()
               if "Traceback" in line or re.search(r": (ERROR|CRITICAL) ", line)]
        if bad:
            self.failures.append(f"the daemon logged {len(bad)} error(s), first: {bad[0]}")
        return result, samples, f"{note}; mailwarden ran as {user}"

    async def measured(self, port: int, master: int, samples: list[Sample]) -> LoadResult:
        """The warm-up and the measured load in one go (no lull between them), the memory
        sampled from the end of the warm-up to the end of the load."""
        args = self.args
        stop = asyncio.Event()

        async def watch() -> None:
            await asyncio.sleep(args.warmup)
            await sampler(master, args.interval, samples, time.monotonic(), stop)

        watcher = asyncio.create_task(watch())
        result = await drive(port, self.message, args.sessions, args.duration, MEASURED_RCPT,
                             args.rate, args.warmup)
        stop.set()
        await watcher
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500, help="concurrent SMTP sessions")
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds measured with mailwarden (600: the soak; 60: quick)")
    parser.add_argument("--baseline", type=float, default=60.0,
                        help="seconds measured without a milter (60)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of load with mailwarden before the measured phase (60)")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between two samples of mailwarden's memory (5)")
    parser.add_argument("--rate", type=float, default=None,
                        help="pace the sessions to this many messages/s in all (default: "
                             "as fast as they go)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (4096)")
    parser.add_argument("--sample", type=int, default=5,
                        help="messages whose Authentication-Results are checked (5)")
    parser.add_argument("--growth-limit", type=float, default=10.0,
                        help="RSS growth (percent, plus 8 MiB) judged as growing (10)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not os.access(SMTP_SINK, os.X_OK) or not postfix_available():
        raise SystemExit("Postfix is not installed (apt-get install postfix)")
    if os.geteuid() != 0:
        raise SystemExit("running Postfix needs root")

    workdir = Path(tempfile.mkdtemp(prefix="load-soak-"))
    workdir.chmod(0o755)
    run = Run(args, workdir)
    key_path = workdir / f"{SELECTOR}.pem"
    write_private(generate("rsa", 2048), str(key_path))
    key = load_key(DOMAIN, SELECTOR, str(key_path))
    _, run.presigned = message_files(workdir, args.size, key)
    run.message = smtp_bytes(run.presigned)
    zone: dict[str, Any] = {
        key.dns_name: [{"TXT": key.public_record}],
        DOMAIN: [{"TXT": SPF_RECORD}, {"A": "127.0.0.1"}],
        HELO: [{"TXT": SPF_RECORD}, {"A": "127.0.0.1"}],
        f"_dmarc.{DOMAIN}": [{"TXT": DMARC_RECORD}],
    }
    dns, dns_port = start_dns(zone, workdir, "127.0.0.1", 0)
    run.dns_address = f"127.0.0.1:{dns_port}"
    failed = True
    try:
        run.sink.start()
        print(f"load_soak: {args.sessions} concurrent SMTP sessions, one message per session, "
              f"{len(run.message) + 3} bytes pre-signed on the wire; baseline "
              f"{args.baseline:.0f} s, mailwarden {args.warmup:.0f} s warm-up + "
              f"{args.duration:.0f} s measured, "
              f"{default_workers()} workers"
              + (f"; paced to {args.rate:g} msg/s" if args.rate else ""), flush=True)
        base = run.baseline()
        print(f"baseline (no milter):   {describe(base)}", flush=True)
        loaded, samples, note = run.with_mailwarden()
        print(f"mailwarden inbound:     {describe(loaded)}  ({note})", flush=True)
        failed = False
    except CaseError as exc:
        print(f"failed: {exc}", flush=True)
        return 1
    finally:
        run.sink.stop()
        dns.terminate()
        dns.wait(10)
        if failed or args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    added50 = loaded.percentile(0.50) - base.percentile(0.50)
    added99 = loaded.percentile(0.99) - base.percentile(0.99)
    errors = base.errors + loaded.errors
    grows, verdict = growth_verdict(samples, args.growth_limit)
    peak_rss = max((s.rss for s in samples), default=0)
    peak_threads = max((s.threads for s in samples), default=0)
    start, end = (samples[0], samples[-1]) if samples else (Sample(0, 0, 0, 0, 0),) * 2
    print(f"throughput: {loaded.rate:,.1f} msg/s with mailwarden, {base.rate:,.1f} msg/s "
          f"without ({loaded.rate / base.rate if base.rate else 0:.2f}x)")
    print(f"added latency: p50 {added50 * 1000:+,.1f} ms, p99 {added99 * 1000:+,.1f} ms")
    print(f"errors: {sum(errors.values())}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))}; first: "
             f"{' | '.join(base.first_errors + loaded.first_errors)})" if errors else ""))
    peak_pss = max((s.pss for s in samples), default=0)
    print(f"mailwarden peak RSS: {peak_rss / MIB:.1f} MiB (master + workers, "
          f"{max((s.processes for s in samples), default=0)} processes; peak PSS, shared pages "
          f"counted once: {peak_pss / MIB:.1f} MiB), peak threads: {peak_threads}")
    print(f"mailwarden RSS: start {start.rss / MIB:.1f} MiB (after the warm-up), end "
          f"{end.rss / MIB:.1f} MiB after {end.at:.0f} s ({len(samples)} samples, every "
          f"{args.interval:g} s)")
    print(f"memory: {verdict}")
    for problem in run.failures:
        print(f"problem: {problem}")
    summary = {
        "sessions": args.sessions, "duration_s": round(loaded.seconds, 1),
        "throughput_msg_s": round(loaded.rate, 1), "baseline_msg_s": round(base.rate, 1),
        "p50_ms": round(loaded.percentile(0.50) * 1000, 1),
        "p99_ms": round(loaded.percentile(0.99) * 1000, 1),
        "baseline_p50_ms": round(base.percentile(0.50) * 1000, 1),
        "baseline_p99_ms": round(base.percentile(0.99) * 1000, 1),
        "added_p50_ms": round(added50 * 1000, 1), "added_p99_ms": round(added99 * 1000, 1),
        "errors": sum(errors.values()), "peak_rss_mib": round(peak_rss / MIB, 1),
        "peak_pss_mib": round(peak_pss / MIB, 1),
        "peak_threads": peak_threads, "rss_start_mib": round(start.rss / MIB, 1),
        "rss_end_mib": round(end.rss / MIB, 1), "memory_grows": grows,
        "rss_samples_mib": [round(s.rss / MIB, 1) for s in samples],
        "thread_samples": [s.threads for s in samples],
    }
    print(f"json: {json.dumps(summary)}")
    return 1 if sum(errors.values()) or grows or run.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
