"""A tiny SMTP sink for the Postfix harness (stdlib asyncio only), run as a subprocess:

    python smtpsink.py --dir DIR --port-file FILE [--host 127.0.0.1] [--port 0]

It accepts every message and stores each one, exactly as received (CRLF line ends, dot-unstuffed,
no header added), in DIR/NNNNNNNN.eml, with its envelope in DIR/NNNNNNNN.json. The .json file is
written first and the .eml file appears by an atomic rename once the message is complete, so a
reader that lists *.eml never sees a partial message. Once listening it writes its port to
FILE (atomically). It serves any number of concurrent sessions; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
from pathlib import Path

HOSTNAME = "sink.test.example"  # must differ from Postfix's myhostname (loop detection)
MAX_LINE = 16 * 1024 * 1024
IDLE_TIMEOUT = 300.0
EHLO_KEYWORDS = ("PIPELINING", "SIZE 104857600", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                 "DSN")
PATH_RE = re.compile(rb"^\s*<([^>]*)>(.*)$")


class Sink:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # go on after messages a previous sink left in the same directory
        done = [int(path.stem) for path in directory.glob("*.eml") if path.stem.isdigit()]
        self.counter = itertools.count(max(done, default=0) + 1)

    def store(self, envelope: dict[str, object], data: bytes) -> str:
        number = next(self.counter)
        name = f"{number:08d}"
        tmp = self.directory / f".{name}.tmp"
        (self.directory / f"{name}.json").write_text(json.dumps(envelope, indent=1) + "\n")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
        os.replace(tmp, self.directory / f"{name}.eml")
        return name

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        helo = ""
        mail_from: str | None = None
        rcpt_tos: list[str] = []

        async def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        try:
            await reply(f"220 {HOSTNAME} ESMTP smtpsink")
            while True:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                if not line:
                    return
                verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
                verb = verb.upper()
                if verb == b"EHLO":
                    helo = arg.decode("utf-8", "replace")
                    mail_from, rcpt_tos = None, []
                    lines = [HOSTNAME, *EHLO_KEYWORDS]
                    text = "\r\n".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{item}"
                        for i, item in enumerate(lines)
                    )
                    await reply(text)
                elif verb == b"HELO":
                    helo = arg.decode("utf-8", "replace")
                    mail_from, rcpt_tos = None, []
                    await reply(f"250 {HOSTNAME}")
                elif verb == b"MAIL":
                    match = PATH_RE.match(arg.partition(b":")[2])
                    if match is None:
                        await reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                        continue
                    mail_from, rcpt_tos = match.group(1).decode("utf-8", "replace"), []
                    await reply("250 2.1.0 Ok")
                elif verb == b"RCPT":
                    match = PATH_RE.match(arg.partition(b":")[2])
                    if mail_from is None:
                        await reply("503 5.5.1 Error: need MAIL command")
                    elif match is None:
                        await reply("501 5.5.4 Syntax: RCPT TO:<address>")
                    else:
                        rcpt_tos.append(match.group(1).decode("utf-8", "replace"))
                        await reply("250 2.1.5 Ok")
                elif verb == b"DATA":
                    if mail_from is None or not rcpt_tos:
                        await reply("503 5.5.1 Error: need RCPT command")
                        continue
                    await reply("354 End data with <CR><LF>.<CR><LF>")
                    chunks: list[bytes] = []
                    while True:
                        data_line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                        if not data_line:
                            return
                        if data_line in (b".\r\n", b".\n"):
                            break
                        if data_line.startswith(b"."):
                            data_line = data_line[1:]
                        chunks.append(data_line)
                    envelope: dict[str, object] = {
                        "mail_from": mail_from, "rcpt_tos": rcpt_tos, "helo": helo,
                        "client_addr": peer[0], "client_port": peer[1],
                    }
                    name = self.store(envelope, b"".join(chunks))
                    mail_from, rcpt_tos = None, []
                    await reply(f"250 2.0.0 Ok: queued as {name}")
                elif verb == b"RSET":
                    mail_from, rcpt_tos = None, []
                    await reply("250 2.0.0 Ok")
                elif verb == b"NOOP":
                    await reply("250 2.0.0 Ok")
                elif verb == b"VRFY":
                    await reply("252 2.0.0 Send some mail, I'll try my best")
                elif verb == b"QUIT":
                    await reply("221 2.0.0 Bye")
                    return
                else:
                    await reply("502 5.5.2 Error: command not recognized")
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    sink = Sink(directory)
    server = await asyncio.start_server(
        sink.session, args.host, args.port, limit=MAX_LINE, backlog=1024, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    port_file = Path(args.port_file)
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, port_file)
    print(f"smtpsink: listening on {args.host}:{port}, storing in {directory}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    print("smtpsink: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", required=True, help="where to store the messages")
    parser.add_argument("--port-file", required=True, help="where to write the bound port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
