"""Per-message latency at one connection, unix: against inet: sockets (DKIM verify policy).

Without TCP_NODELAY, libmilter over inet costs ~44 ms per message (Nagle holding a reply piece
until the MTA's delayed ACK); the daemon sets it on the listening socket.

Run:  .venv/bin/python benchmarks/milter_latency.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "integration"),
                str(ROOT / "tests")]

from daemon import Daemon  # noqa: E402
from milterload import Message, make_message, run_load  # noqa: E402

from mailwarden.devtools.devdns import DevDNSServer  # noqa: E402
from mailwarden.dkim.keys import generate, load_key, write_private  # noqa: E402
from mailwarden.dkim.sign import sign_message  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="latency-"))
    os.chmod(workdir, 0o755)
    path = workdir / "key.pem"
    write_private(generate("rsa"), str(path))
    key = load_key("example.org", "sel", str(path))
    body = make_message(4096)
    fields = sign_message(body, [key])
    signed = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                      for n, v in fields) + body
    with DevDNSServer({key.dns_name: [{"TXT": key.public_record}]}) as dns:
        for kind in ("unix", "inet"):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            listen = f"unix:{workdir}/{kind}.sock" if kind == "unix" else \
                f"inet:{port}@127.0.0.1"
            config = {"listen": listen, "authserv_id": "mx.example", "log_level": "warning",
                      "dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
                      "rules": {"eom": [{"name": "dkim", "check": "dkim_verify"}]}}
            daemon = Daemon(workdir / kind, config)
            daemon.start()
            try:
                report = run_load(daemon.socket, [Message(signed, mail_from="a@example.org")],
                                  connections=1, duration=args.seconds, warmup=0.5)
            finally:
                daemon.stop()
            print(f"{kind:<5} p50 {report.latency_p50 * 1000:6.2f} ms  p99 "
                  f"{report.latency_p99 * 1000:6.2f} ms  {report.messages_per_second:8,.0f} msg/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
