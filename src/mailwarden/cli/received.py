"""`mailwarden dmarc ingest`: aggregate reports others sent about our domains, from files,
directories, a Maildir or standard input, into the DMARC store."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailwarden.cli.common import dns_options, resolver_from, store_options, with_store
from mailwarden.textout import shown

if TYPE_CHECKING:
    from mailwarden.dmarc.store import Store


def add_ingest_command(dmarc_sub: Any) -> None:
    ingest = dmarc_sub.add_parser(
        "ingest", help="store the aggregate reports others sent about our domains",
        description="Read DMARC aggregate reports (RFC 9990, or RFC 7489's format) that other "
        "receivers sent to our rua= addresses: bare .xml, .xml.gz or .zip files, or whole "
        "messages with the report attached, from files, directories (every file below), a "
        "Maildir (--maildir) or standard input (-), and store each report once in "
        "dmarc.store (a report seen again is reported as a duplicate). Inputs are unpacked "
        "within limits (20 MiB in, 50 MiB unpacked) and parsed without DTDs or entities; a "
        "refused input is named with its reason. Started as root it runs as the store's "
        "owner. Exit status: 0 every input stored or already there, 1 an input was refused "
        "or the store failed, 2 a configuration error.")
    ingest.add_argument("inputs", nargs="*", metavar="PATH",
                        help="report files, messages or directories; - for standard input")
    ingest.add_argument("--maildir", action="append", default=[], metavar="DIR",
                        help="a Maildir whose messages (new/ and cur/) are read (repeatable)")
    store_options(ingest)
    ingest.add_argument("--json", action="store_true", help="print one JSON object")
    ingest.set_defaults(handler=_cmd_dmarc_ingest, parser=ingest)

    sources = dmarc_sub.add_parser(
        "sources", help="who sends as our domains, from the reports others sent us",
        description="From the aggregate reports received about our domains (dmarc ingest), "
        "per domain and source IP (with its reverse name): the messages, how many passed "
        "DKIM and SPF aligned as the reporters saw them, and a verdict per source: aligned "
        "(DKIM), needs DKIM (passes by SPF only, which forwarding breaks), partly failing "
        "(a service to fix), unknown sender (never passes: probably spoofing); then one line "
        "per domain saying whether p=quarantine or p=reject is safe and what still fails. "
        "Exit status: 0 printed, 1 the store cannot be read, 2 a configuration error.")
    sources.add_argument("--domain", metavar="D", help="only this domain (default: every one)")
    sources.add_argument("--days", type=int, default=30, metavar="N",
                         help="reports whose period ended in the last N days (default: 30)")
    sources.add_argument("--no-dns", action="store_true",
                         help="do not look up the sources' reverse names")
    dns_options(sources)  # for the reverse names
    store_options(sources)
    sources.set_defaults(handler=_cmd_dmarc_sources)


def _reverse_name(resolver: Any, ip: str) -> str:
    """The first PTR name of `ip`, or "" (none, an error, or not an address at all)."""
    import ipaddress

    try:
        reverse = ipaddress.ip_address(ip).reverse_pointer
    except ValueError:
        return ""
    answer = resolver.ptr(reverse)
    return str(answer.records[0]).rstrip(".") if answer.ok and answer.records else ""


def _cmd_dmarc_sources(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.sources import collect

    domains, status = with_store(
        args, lambda store: collect(store, time.time() - args.days * 86400, args.domain))
    if domains is None:
        return status
    if not args.no_dns:
        resolver = resolver_from(args)
        for domain in domains:
            for source in domain.sources[:50]:
                source.name = _reverse_name(resolver, source.ip)
    if args.json:
        print(json.dumps({"days": args.days, "domains": [
            {"domain": d.domain, "policy": d.policy, "advice": d.advice(),
             "sources": [s.as_dict() for s in d.sources]} for d in domains]}, indent=2))
        return 0
    for domain in domains:
        print(f"{domain.domain} (p={domain.policy}), last {args.days} days:")
        for s in domain.sources:
            name = f" {s.name}" if s.name else ""
            print(shown(f"  {s.ip}{name}: {s.messages} messages, DKIM aligned {s.dkim_pass}, "
                        f"SPF aligned {s.spf_pass}, failing {s.failing}: {s.verdict} "
                        f"(reported by {', '.join(sorted(s.reporters))})"))
        print(shown(domain.advice()))
    if not domains:
        print("no received reports in the window (mailwarden dmarc ingest stores them)")
    return 0


def _inputs(args: argparse.Namespace) -> Iterator[tuple[str, bytes | OSError]]:
    """(name, content or the error reading it) of every input."""
    paths: list[Path] = []
    for text in args.inputs:
        if text == "-":
            yield "-", sys.stdin.buffer.read()
            continue
        path = Path(text)
        paths += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for maildir in args.maildir:
        for sub in ("new", "cur"):
            paths += sorted(p for p in (Path(maildir) / sub).glob("*") if p.is_file())
    for path in paths:
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            yield str(path), exc


def _ingest(args: argparse.Namespace, store: Store) -> list[dict[str, str]]:
    """Every input into `store`: what became of each report or refused input."""
    from mailwarden.dmarc.received import read_reports
    from mailwarden.dmarc.received_store import store_report

    outcomes: list[dict[str, str]] = []
    for name, content in _inputs(args):
        if isinstance(content, OSError):
            outcomes.append({"input": name, "status": "refused",
                             "reason": f"cannot read: {content.strerror}"})
            continue
        reports, refused = read_reports(content)
        outcomes += [{"input": name, "status": "refused", "reason": r.reason} for r in refused]
        for report in reports:
            stored = store_report(store, report, name, time.time())
            outcomes.append({"input": name, "status": "stored" if stored else "duplicate",
                             "reporter": report.org_name, "report_id": report.report_id,
                             "domain": report.domain, "records": str(len(report.records))})
    return outcomes


def _cmd_dmarc_ingest(args: argparse.Namespace) -> int:
    if not args.inputs and not args.maildir:
        args.parser.error("give report files, directories, --maildir or -")
    outcomes, status = with_store(args, lambda store: _ingest(args, store), create=True)
    if outcomes is None:
        return status
    if args.json:
        print(json.dumps({"reports": outcomes}, indent=2))
    else:
        for item in outcomes:
            if item["status"] == "refused":
                print(shown(f"refused {item['input']}: {item['reason']}"))
            else:
                print(shown(f"{item['status']} {item['report_id']} from {item['reporter']} "
                            f"for {item['domain']} ({item['records']} records): "
                            f"{item['input']}"))
    return 1 if any(item["status"] == "refused" for item in outcomes) else 0
