"""Monitor mode switched by a reload, and the Prometheus endpoint, on the running daemon:
messages over the milter protocol (benchmarks/milterload.py's MilterClient), DNS from the
loopback server, /metrics scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from milterload import MilterClient, make_message
from prometheus_client.parser import text_string_to_metric_families

from mailwarden.devtools.devdns import DevDNSServer

ZONE = {
    "good.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    "spoofed.example": [{"TXT": "v=spf1 -all"}],
}
MESSAGE = make_message(2048)
DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "mailwarden.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(workdir: Path, dns_port: int, metrics_port: int, mode: str,
           transport: str = "libmilter") -> dict[str, object]:
    return {
        "transport": transport,
        "listen": f"unix:{workdir}/milter.sock",
        "authserv_id": "mx.test.example",
        "workers": 2,
        "drain_timeout": 5,
        "log_level": "info",
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 0.5, "lifetime": 1.0},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "rules": {"mail": [{"name": "spf", "check": "spf", "header": "auth", "mode": mode}]},
    }


@pytest.fixture(params=["libmilter", "native"])
def daemon(dns_server: DevDNSServer, tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[tuple[Daemon, int]]:
    dns_server.load(ZONE)
    port = free_port()
    with Daemon(tmp_path, config(tmp_path, dns_server.port, port, "monitor",
                                 request.param)) as running:
        yield running, port


def send(daemon: Daemon, sender: str) -> tuple[str, str | None]:
    with MilterClient(daemon.socket) as client:
        result = client.send_message(client_ip="192.0.2.1", helo="client.good.example",
                                     mail_from=sender, rcpts=["bob@mx.test.example"],
                                     message=MESSAGE)
    return result.action, result.reply


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_monitor_then_enforce_by_reload_with_metrics(daemon: tuple[Daemon, int],
                                                     dns_server: DevDNSServer) -> None:
    running, port = daemon
    master = running.process.pid if running.process else 0

    # monitor: the spoofed sender passes, the log says what enforcement would have done
    assert send(running, "ceo@spoofed.example") == ("continue", None)
    assert send(running, "alice@good.example") == ("continue", None)
    log = running.wait_for_log('monitor="reject by spf at mail: 550 5.7.23')
    assert "verdict=continue" in log
    samples = scrape(port)
    assert value(samples, "mailwarden_monitored_verdicts_total", verdict="reject",
                 rule="spf") == 1
    assert value(samples, "mailwarden_transactions_total", verdict="continue",
                 stage="eom") == 2
    assert value(samples, "mailwarden_check_results_total", method="spf", result="fail") == 1
    assert value(samples, "mailwarden_check_results_total", method="spf", result="pass") == 1
    assert value(samples, "mailwarden_check_duration_seconds_count", check="spf") == 2
    lookups = sum(v for (name, _), v in samples.items()
                  if name == "mailwarden_dns_lookup_duration_seconds_count")
    assert lookups >= 2
    assert value(samples, "mailwarden_dns_cache_requests_total", outcome="miss") >= 2
    wait_for(lambda: value(scrape(port), "mailwarden_connections_active") == 0)

    # enforce, by a reload: same master, same workers' socket, the spoofed sender is refused
    running.write_config(config(running.workdir, dns_server.port, port, "enforce",
                                str(running.config["transport"])))
    os.kill(master, signal.SIGHUP)
    running.wait_for_log("configuration reloaded")
    time.sleep(0.3)  # the workers read the new configuration from their control pipes
    action, reply = send(running, "ceo@spoofed.example")
    assert action == "reject" and reply is not None and reply.startswith("550 5.7.23")
    assert running.process is not None and running.process.pid == master
    assert running.process.poll() is None
    samples = scrape(port)
    assert value(samples, "mailwarden_transactions_total", verdict="reject", stage="mail") == 1
    assert value(samples, "mailwarden_monitored_verdicts_total", verdict="reject",
                 rule="spf") == 1
    assert value(samples, "mailwarden_reloads_total", result="ok") == 1
    # the same sender again: the SPF record now comes from a worker's cache (each worker has
    # its own; three more messages over two workers: one of them sees the sender twice)
    for _ in range(3):
        send(running, "ceo@spoofed.example")
    assert value(scrape(port), "mailwarden_dns_cache_requests_total", outcome="hit") >= 1

    # a broken configuration: refused, counted, the enforcing policy stays
    running.config_path.write_text("rules: [\n")
    os.kill(master, signal.SIGHUP)
    running.wait_for_log("reload refused")
    assert value(scrape(port), "mailwarden_reloads_total", result="refused") == 1
    assert send(running, "ceo@spoofed.example")[0] == "reject"

    # an MTA that breaks the protocol: the connection is closed; the native transport counts
    # it (libmilter drops it without telling its callbacks; it logs to syslog)
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(running.socket.removeprefix("unix:"))
        bad.sendall(b"\x00\x00\x00\x05Zjunk")
        bad.settimeout(5)
        assert bad.recv(100) == b""
    if running.config["transport"] == "native":
        wait_for(lambda: value(scrape(port), "mailwarden_errors_total", kind="protocol") == 1)
    assert send(running, "ceo@spoofed.example")[0] == "reject"  # still serving

    # the Grafana dashboard asks only for series that exist, by labels they have
    exported: dict[str, set[str]] = {}
    for name, labels in scrape(port):
        exported.setdefault(name, set()).update(key for key, _ in labels)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\b(mailwarden_\w+)", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
        labels = set(re.findall(r"(\w+)=~?\"", expr))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels.update(label.strip() for label in group.split(","))
        have = set().union(*(exported[name] for name in names))
        assert labels <= have, f"{expr!r}: labels {labels - have} not on {names}"


def test_metrics_port_in_use_is_a_clear_start_error(dns_server: DevDNSServer,
                                                    tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(tmp_path, config(tmp_path, dns_server.port, port, "enforce"))
        # start() may see the milter socket open for a moment before the exit
        with contextlib.suppress(AssertionError):
            daemon.start()
        assert daemon.process is not None
        try:
            assert daemon.process.wait(10) == 1
        finally:
            if daemon.process.poll() is None:  # it must not outlive a failed test
                daemon.stop()
    assert f"cannot listen on 127.0.0.1:{port} (metrics)" in daemon.log()
    leftovers = [p for p in Path("/tmp").glob("mailwarden-metrics-*")
                 if p.stat().st_mtime > time.time() - 30 and not any(p.iterdir())]
    assert leftovers == []
