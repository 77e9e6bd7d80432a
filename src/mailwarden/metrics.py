"""Prometheus metrics: what the daemon counts, and the endpoint that serves it.

Off by default: `METRICS` is a recorder that does nothing, so the hot path pays one method call
per event. `enable()` (in the master, before the workers are forked) switches to
prometheus_client in its multi-process mode: every process writes its own memory-mapped files
in a private directory and the master's HTTP endpoint adds them up at each scrape.

Names follow Prometheus conventions: counters end in `_total`, durations are histograms in
`_seconds`, labels have small fixed vocabularies (check names, RFC result words, rule names
from the configuration).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
from typing import Any

log = logging.getLogger("mailwarden.metrics")

# Checks take from well under a millisecond (cached SPF) to the DNS lifetime (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class Recorder:
    """The events the daemon reports. This base class drops them (metrics disabled)."""

    def transaction(self, verdict: str, stage: str) -> None:
        """A message (or connection) got its final verdict."""

    def monitored(self, verdict: str, rule: str) -> None:
        """A rule in monitor mode would have given `verdict`; it was not applied."""

    def signing(self, check: str, result: str) -> None:
        """A signing or sealing rule ran: signed/sealed, none (nothing to sign with), error."""

    def check(self, check: str, seconds: float) -> None:
        """One run of a rule's check."""

    def result(self, method: str, result: str) -> None:
        """One result recorded (spf=pass, dkim=fail, ...)."""

    def dns_lookup(self, rdtype: str, status: str, seconds: float) -> None:
        """One lookup that went to the network (cache misses only)."""

    def dns_cache(self, hit: bool) -> None:
        """One lookup, answered from the cache or not."""

    def connections(self, delta: int) -> None:
        """An MTA connection opened (+1) or closed (-1)."""

    def reload(self, ok: bool) -> None:
        """A configuration reload, applied or refused."""

    def error(self, kind: str) -> None:
        """An internal error, a protocol error from the MTA, a worker lost."""

    def dmarc_recording(self, recorded: bool) -> None:
        """One DMARC evaluation written into the report store, or not."""

    def dmarc_store(self, available: bool) -> None:
        """Whether this process has its DMARC report store open."""

    def received_report(self, result: str) -> None:
        """One aggregate report that arrived by mail: stored, duplicate or refused."""

    def failure_report(self, result: str) -> None:
        """One failure report (RFC 9991) for one destination: queued, rate-limited, dropped
        (by the daemon); sent, skipped, failed, uncertain (by `dmarc failures`)."""


class PrometheusRecorder(Recorder):
    """Every event into a prometheus_client metric (multi-process mode)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._transactions = Counter(
            "mailwarden_transactions_total",
            "Messages and connections by the verdict applied and the stage that gave it",
            ["verdict", "stage"])
        self._monitored = Counter(
            "mailwarden_monitored_verdicts_total",
            "Verdicts that rules in monitor mode would have given, not applied",
            ["verdict", "rule"])
        self._results = Counter(
            "mailwarden_check_results_total",
            "Results recorded, by method (spf, dkim, dmarc, arc, iprev, relay) and result",
            ["method", "result"])
        self._signing = Counter(
            "mailwarden_signing_total",
            "Signing and sealing rules run, by check (dkim_sign, arc_seal) and result "
            "(signed, sealed, none, error)", ["check", "result"])
        self._check_seconds = Histogram(
            "mailwarden_check_duration_seconds", "Time one check took, DNS included",
            ["check"], buckets=LATENCY_BUCKETS)
        self._dns_seconds = Histogram(
            "mailwarden_dns_lookup_duration_seconds",
            "Time of DNS lookups that were not answered from the cache",
            ["type", "status"], buckets=LATENCY_BUCKETS)
        self._dns_cache = Counter(
            "mailwarden_dns_cache_requests_total", "DNS lookups by cache outcome (hit, miss)",
            ["outcome"])
        self._connections = Gauge(
            "mailwarden_connections_active", "MTA connections open now",
            multiprocess_mode="livesum")
        self._reloads = Counter(
            "mailwarden_reloads_total", "Configuration reloads by result (ok, refused)",
            ["result"])
        self._errors = Counter(
            "mailwarden_errors_total",
            "Internal errors (check, session), MTA protocol errors (protocol), lost workers",
            ["kind"])
        self._recordings = Counter(
            "mailwarden_dmarc_recordings_total",
            "DMARC evaluations for aggregate reports, by result (recorded, not_recorded)",
            ["result"])
        self._received = Counter(
            "mailwarden_received_reports_total",
            "Aggregate reports about our domains that arrived by mail (dmarc_reports rule), "
            "by result (stored, duplicate, refused)", ["result"])
        self._failures = Counter(
            "mailwarden_failure_reports_total",
            "DMARC failure reports (RFC 9991) per destination, by result: queued, "
            "rate_limited, dropped (daemon), sent, skipped, failed (dmarc failures)",
            ["result"])
        self._store_available = Gauge(
            "mailwarden_dmarc_store_available",
            "1 when every worker that has tried has its DMARC report store open, 0 when one "
            "cannot open or write it", multiprocess_mode="livemin")
        # every known series from the start, at 0, so that rates and alerts see them
        for kind in ("check", "session", "protocol", "worker"):
            self._errors.labels(kind)
        for result in ("stored", "duplicate", "refused"):
            self._received.labels(result)
        for result in ("queued", "rate_limited", "dropped", "sent", "failed"):
            self._failures.labels(result)
        for check, results in (("dkim_sign", ("signed", "none", "error")),
                               ("arc_seal", ("sealed", "error"))):
            for result in results:
                self._signing.labels(check, result)

    def transaction(self, verdict: str, stage: str) -> None:
        self._transactions.labels(verdict, stage).inc()

    def monitored(self, verdict: str, rule: str) -> None:
        self._monitored.labels(verdict, rule).inc()

    def signing(self, check: str, result: str) -> None:
        self._signing.labels(check, result).inc()

    def check(self, check: str, seconds: float) -> None:
        self._check_seconds.labels(check).observe(seconds)

    def result(self, method: str, result: str) -> None:
        self._results.labels(method, result).inc()

    def dns_lookup(self, rdtype: str, status: str, seconds: float) -> None:
        self._dns_seconds.labels(rdtype, status).observe(seconds)

    def dns_cache(self, hit: bool) -> None:
        self._dns_cache.labels("hit" if hit else "miss").inc()

    def connections(self, delta: int) -> None:
        self._connections.inc(delta)

    def reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "refused").inc()

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def dmarc_recording(self, recorded: bool) -> None:
        self._recordings.labels("recorded" if recorded else "not_recorded").inc()

    def dmarc_store(self, available: bool) -> None:
        self._store_available.set(1 if available else 0)

    def received_report(self, result: str) -> None:
        self._received.labels(result).inc()

    def failure_report(self, result: str) -> None:
        self._failures.labels(result.replace("-", "_")).inc()


METRICS: Recorder = Recorder()


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, such as 127.0.0.1:9894, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, [::1]:9894, not {text!r}")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
            raise ValueError(f"bad host in {text!r}") from None
    return host, int(port)


class Endpoint:
    """The multi-process metrics directory and the HTTP server of /metrics (in the master)."""

    def __init__(self, address: str, owner: tuple[int | None, int | None]) -> None:
        self.address = address
        self.directory = tempfile.mkdtemp(prefix="mailwarden-metrics-")
        uid, gid = owner
        if uid is not None and gid is not None:
            os.chown(self.directory, uid, gid)  # the workers write here after dropping root
        # prometheus_client picks multi-process mode from this variable when it is imported
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen (raises OSError when the address cannot be bound) and switch METRICS on."""
        global METRICS
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        host, port = parse_address(self.address)
        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        METRICS = PrometheusRecorder()
        log.info("metrics on http://%s/metrics", self.address)

    def process_gone(self, pid: int) -> None:
        """A worker ended: its live gauges no longer count."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)

