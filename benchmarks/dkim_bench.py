"""DKIM sign and verify through the milter protocol: mailwarden against OpenDKIM, in one run.

Both milters listen on unix sockets, resolve keys from the same loopback DNS server (its own
process), and get the same messages from benchmarks/milterload.py (the MTA side of the milter
protocol, spoken directly). For each case it prints messages/s, p50 and p99 latency for both and
the ratio mailwarden/OpenDKIM; then the peak RSS (VmHWM) of each milter while it handles one
20 MiB message.

  sign    4 KiB and 100 KiB, with RSA-2048, and with Ed25519
  verify  4 KiB and 100 KiB, signed with RSA-2048, and with Ed25519
(OpenDKIM 2.11 signs with one algorithm per process, so dual signing is not compared.)

Run:  .venv/bin/python benchmarks/dkim_bench.py [--seconds 3] [--connections 1 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests"))

from daemon import Daemon  # noqa: E402
from milterload import Message, MilterClient, make_message, run_load  # noqa: E402
from opendkim import OpenDKIM, opendkim_available  # noqa: E402

from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private  # noqa: E402
from mailwarden.dkim.sign import sign_message  # noqa: E402

DOMAIN = "bench.example"
# Verification is measured from an outside client: OpenDKIM treats 127.0.0.1 as an internal
# host and passes its mail through without verifying it (no Authentication-Results at all).
OUTSIDE = "192.0.2.10"


def start_dns(zone: dict[str, Any], workdir: Path, host: str = "127.0.0.1", port: int = 0
              ) -> tuple[subprocess.Popen[str], int]:
    """mailwarden.devtools.devdns serving `zone` in its own process on HOST:PORT (0: any free port;
    OpenDMARC can only ask port 53); returns the process and its port."""
    path = workdir / "zone.yaml"
    path.write_text(yaml.safe_dump(zone))
    process = subprocess.Popen(
        [sys.executable, "-m", "mailwarden.devtools.devdns", str(path), "--host", host,
         "--port", str(port)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        process.wait(5)
        raise SystemExit(f"devdns did not start on {host}:{port}: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def key(workdir: Path, selector: str, kind: str) -> SigningKey:
    path = workdir / f"{selector}.pem"
    write_private(generate(kind), str(path))
    return load_key(DOMAIN, selector, str(path))


def peak_rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = max(total, int(line.split()[1]))
        except OSError:
            continue
    return total


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().split(")")[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


TRANSPORTS = ("libmilter", "native")


def mailwarden(workdir: Path, dns_port: int, keys: list[SigningKey], mode: str,
               transport: str = "libmilter") -> Daemon:
    rule = {"name": "sign", "check": "dkim_sign", "allowed_hosts": "all"} if mode == "sign" \
        else {"name": "verify", "check": "dkim_verify"}
    config = {
        "transport": transport,
        "listen": f"unix:{workdir}/mailwarden.sock", "authserv_id": "mx.bench.example",
        "log_level": "warning", "drain_timeout": 2,  # workers: the default, 2 per core
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2.0},
        "hosts": {"all": ["0.0.0.0/0", "::/0"]},
        "signing": {"keys": [{"domain": k.domain, "selector": k.selector, "key": k.path}
                             for k in keys]},
        "rules": {"eom": [rule]},
    }
    daemon = Daemon(workdir, config)
    daemon.start()
    return daemon


def preflight(socket: str, message: Message, who: str) -> None:
    """One verification must give dkim=pass in an Authentication-Results field, or the numbers
    would measure something else than verification."""
    with MilterClient(socket, timeout=30) as client:
        result = client.send_message(client_ip=message.client_ip, helo=message.helo,
                                     mail_from=message.mail_from, rcpts=list(message.rcpts),
                                     message=message.data)
    fields = [v for n, v in result.headers_added if n.lower() == "authentication-results"]
    if result.action not in ("accept", "continue") or not any("dkim=pass" in f for f in fields):
        raise SystemExit(f"{who} did not verify the message: {result.action}, {fields}")


def measure(socket: str, messages: list[Message], connections: int, seconds: float
            ) -> tuple[float, float, float, int]:
    report = run_load(socket, messages, connections=connections, duration=seconds,
                      warmup=min(1.0, seconds / 3))
    return (report.messages_per_second, report.latency_p50 * 1000, report.latency_p99 * 1000,
            report.errors)


def rss_for_big_message(socket: str, pids: list[int], message: bytes, client_ip: str) -> int:
    before = peak_rss_kib(pids)
    with MilterClient(socket, timeout=120) as client:
        client.send_message(client_ip=client_ip, helo="client.bench.example",
                            mail_from=f"alice@{DOMAIN}", rcpts=["bob@example.net"],
                            message=message)
    return max(0, peak_rss_kib(pids) - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-big", action="store_true", help="skip the 20 MiB message")
    parser.add_argument("--only-big", action="store_true", help="only the 20 MiB message")
    args = parser.parse_args()
    if not opendkim_available():
        raise SystemExit("OpenDKIM is not installed (apt-get install opendkim opendkim-tools)")
    workdir = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    os.chmod(workdir, 0o755)
    rsa, ed = key(workdir, "rsa", "rsa"), key(workdir, "ed", "ed25519")
    zone = {k.dns_name: [{"TXT": k.public_record}] for k in (rsa, ed)}
    dns, port = start_dns(zone, workdir)
    rows: list[str] = []
    try:
        bodies = {"4KiB": make_message(4096, from_addr=f"alice@{DOMAIN}"),
                  "100KiB": make_message(100 * 1024, from_addr=f"alice@{DOMAIN}")}
        # OpenDKIM 2.11 signs with one algorithm per process, so each key type is its own case.
        cases = () if args.only_big else (("sign", (("rsa-2048", [rsa]), ("ed25519", [ed]))),
                                          ("verify", (("rsa-2048", [rsa]), ("ed25519", [ed]))))
        for mode, keysets in cases:
            for label, keys in keysets:
                for size, body in bodies.items():
                    if mode == "verify":
                        fields = sign_message(body, keys)
                        body = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                                        for n, v in fields) + body
                    client_ip = OUTSIDE if mode == "verify" else "127.0.0.1"
                    messages = [Message(body, mail_from=f"alice@{DOMAIN}", client_ip=client_ip)]
                    odk_dir = workdir / f"odk-{mode}-{label}-{size}"
                    mw_dir = workdir / f"mw-{mode}-{label}-{size}"
                    odk = OpenDKIM(odk_dir, mode="s" if mode == "sign" else "v",
                                   keys=[(k.domain, k.selector, Path(k.path)) for k in keys],
                                   dns=("127.0.0.1", port), log=False)
                    odk.start()
                    daemons = {t: mailwarden(mw_dir / t, port, keys, mode, t)
                               for t in TRANSPORTS}
                    try:
                        if mode == "verify":
                            for transport, daemon in daemons.items():
                                preflight(daemon.socket, messages[0], f"mailwarden {transport}")
                            preflight(odk.socket, messages[0], "OpenDKIM")
                        for connections in args.connections:
                            theirs = measure(odk.socket, messages, connections, args.seconds)
                            for transport, daemon in daemons.items():
                                ours = measure(daemon.socket, messages, connections,
                                               args.seconds)
                                rows.append(
                                    f"{mode:<7}{label:<13}{size:<8}{connections:>5} "
                                    f"{ours[0]:>9,.0f} {theirs[0]:>9,.0f} "
                                    f"{ours[0] / theirs[0]:>6.2f}x"
                                    f" {ours[1]:>7.1f}/{ours[2]:<7.1f} {theirs[1]:>7.1f}/"
                                    f"{theirs[2]:<7.1f} {ours[3] + theirs[3]:>4}  {transport}")
                                print(rows[-1], flush=True)
                    finally:
                        for daemon in daemons.values():
                            daemon.stop()
                        odk.stop()
        big: list[str] = []
        if not args.skip_big:
            message = make_message(20 * 1024 * 1024, from_addr=f"alice@{DOMAIN}")
            fields = sign_message(message, [rsa])
            signed = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                              for n, v in fields) + message
            for mode, data in (("sign", message), ("verify", signed)):
                odk = OpenDKIM(workdir / f"odk-big-{mode}", mode="s" if mode == "sign" else "v",
                               keys=[(rsa.domain, rsa.selector, Path(rsa.path))],
                               dns=("127.0.0.1", port), log=False)
                odk.start()
                daemon = mailwarden(workdir / f"mw-big-{mode}", port, [rsa], mode)
                try:
                    time.sleep(0.5)
                    assert daemon.process is not None and odk.pid is not None
                    client_ip = OUTSIDE if mode == "verify" else "127.0.0.1"
                    ours_rss = rss_for_big_message(daemon.socket,
                                                   children(daemon.process.pid), data, client_ip)
                    theirs_rss = rss_for_big_message(odk.socket, [odk.pid], data, client_ip)
                    big.append(f"20 MiB message, {mode} RSA-2048: peak RSS growth mailwarden "
                               f"{ours_rss / 1024:.1f} MiB ({ours_rss / 20480:.2f}x the message), "
                               f"OpenDKIM {theirs_rss / 1024:.1f} MiB")
                finally:
                    daemon.stop()
                    odk.stop()
    finally:
        dns.terminate()
        dns.wait(10)
    print()
    print(f"{'mode':<7}{'keys':<13}{'size':<8}{'conns':>5} {'mw msg/s':>9} {'odk msg/s':>9}"
          f" {'ratio':>7} {'mw p50/p99 ms':>15} {'odk p50/p99 ms':>15} {'errs':>4}  transport")
    for row in rows:
        print(row)
    for line in big:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
