"""The README's `mailwarden test` example is reproducible from files in the repository (issue
15 #9): its commands, run against the example zone, print exactly the block the README shows.
Before, the message was nowhere and the zone lacked its records: CONTINUE, not REJECT."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from mailwarden.devtools.devdns import DevDNSServer, load_zone_file

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> tuple[list[str], str]:
    """The `mailwarden test` command of the README's example (arguments) and its output."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(\$ \.venv/bin/python -m mailwarden\.devtools\.devdns .*?)```",
                      text, re.S)
    assert block is not None, "the README's mailwarden test example is gone"
    lines = block.group(1).splitlines()
    command, rest = [], lines[1:]
    while rest:  # the second prompt line and its continuation lines
        line = rest.pop(0)
        command.append(line.removeprefix("$ ").rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command)), "\n".join(rest) + "\n"


def test_the_readme_example_prints_what_the_readme_shows(dns_server: DevDNSServer) -> None:
    dns_server.load(load_zone_file(ROOT / "conf" / "example-dns.yaml"))
    argv, shown = readme_example()
    assert argv[0] == ".venv/bin/mailwarden" and argv[1] == "test", argv
    server = argv.index("--nameserver") + 1
    argv[server] = f"127.0.0.1:{dns_server.port}"  # the README's port 5353 may be taken
    done = subprocess.run([sys.executable, "-m", "mailwarden", *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
