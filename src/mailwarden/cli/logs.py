"""`mailwarden log-summary`: the decision lines of a mail log, counted."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from typing import Any

from mailwarden import logparse
from mailwarden.logsummary import format_summary, summarize
from mailwarden.textout import shown


def add_log_commands(commands: Any) -> None:
    summary = commands.add_parser(
        "log-summary", help="count the decisions in mail log files (pflogsumm-style)",
        description="Read mailwarden's decision lines from log files (syslog files such as "
        "/var/log/mail.log, rotated .gz ones, `journalctl -t mailwarden` output, or the "
        "daemon's standard error) and print how many of each verdict, the rules that refused, "
        "the most refused clients and From domains, the causes of temporary failures, what "
        "monitor mode held back, and what signing did. Other lines are skipped. Exit status: 0 "
        "counted, 1 a file cannot be read.",
    )
    summary.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                         help="log files, plain or gzip; - for standard input (default: -)")
    summary.add_argument("--top", type=int, default=10, metavar="N",
                         help="entries shown per list (default: 10)")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=_cmd_log_summary)


def _lines(files: list[str]) -> Iterator[str]:
    for path in files:
        if path == "-":
            yield from sys.stdin.buffer.read().decode("utf-8", "replace").splitlines()
            continue
        opener: Any = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as stream:
            yield from stream


def _cmd_log_summary(args: argparse.Namespace) -> int:
    try:
        summary = summarize(logparse.decisions(_lines(args.files)))
    except OSError as exc:
        print(f"mailwarden: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.as_dict(args.top), indent=2))
    else:
        print(shown(format_summary(summary, args.top), keep="\n"))
    return 0
