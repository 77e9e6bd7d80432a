"""`mailwarden dmarc`: check a domain's policy, send aggregate reports, summarise the store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from mailwarden.cli.common import (
    config_option,
    dns_options,
    load_config,
    on_store,
    positive_float,
    resolver_from,
    store_options,
    with_store,
)
from mailwarden.cli.received import add_ingest_command
from mailwarden.dns import Resolver, system_nameservers
from mailwarden.relay import HostGroup, internal_networks
from mailwarden.storeowner import become_store_owner


def add_dmarc_commands(commands: Any) -> None:
    dmarc_cmd = commands.add_parser(
        "dmarc", help="DMARC policy checks and aggregate reports",
        description="DMARC tools: a domain's effective policy (RFC 9989), the daily aggregate "
        "reports (RFC 9990) from the store the daemon writes, and a summary of that store.")
    dmarc_sub = dmarc_cmd.add_subparsers(dest="dmarc_command", required=True, metavar="COMMAND")
    dcheck = dmarc_sub.add_parser(
        "check", help="show a domain's effective DMARC policy and every problem in its record",
        description="Find the DMARC policy that applies to mail from DOMAIN (the RFC 9989 DNS "
        "tree walk, or the RFC 7489 Public Suffix List with --legacy) and print the record, "
        "the effective policy with every default filled in, and every problem in the record. "
        "Exit status: 0 the lookups completed (problems are printed, they are not errors), "
        "75 a DNS lookup failed temporarily.")
    dcheck.add_argument("domain", help="the From: domain to look up")
    dcheck.add_argument("--legacy", action="store_true",
                        help="RFC 7489 Public Suffix List instead of the RFC 9989 tree walk")
    dns_options(dcheck)
    dcheck.set_defaults(handler=_cmd_dmarc_check)
    report = dmarc_sub.add_parser(
        "report", help="build and send RFC 9990 aggregate reports",
        description="Build the aggregate reports of a period from dmarc.store and send each to "
        "its rua destinations through dmarc.reports.smarthost (or write them to "
        "dmarc.reports.directory), once per destination: the store's ledger keeps a second "
        "run from sending again. systemd/mailwarden-dmarc-report.timer runs it daily. Started "
        "as root it runs as the store's owner. Exit status: 0 nothing failed, 1 a destination "
        "or the store failed, 2 a configuration error.")
    config_option(report)
    report.add_argument("--period", default="yesterday",
                        help='"yesterday" (UTC), "last-hour", or START..END (ISO 8601) '
                        '(default: yesterday)')
    report.add_argument("--dry-run", action="store_true", help="build, print, send nothing")
    report.set_defaults(handler=_cmd_dmarc_report)
    failures = dmarc_sub.add_parser(
        "failures", help="send the queued RFC 9991 failure reports",
        description="Send the failure reports the daemon queued in dmarc.store (made only when "
        "dmarc.failure_reports is configured and the sender's record has ruf=) through "
        "dmarc.reports.smarthost, each once per destination, after verifying external "
        "destinations as for aggregate reports. systemd/mailwarden-dmarc-failures.timer runs "
        "it every five minutes. Started as root it runs as the store's owner. Exit status: 0 "
        "nothing failed, 1 a destination or the store failed (the next run tries again), 2 a "
        "configuration error.")
    config_option(failures)
    failures.add_argument("--dry-run", action="store_true",
                          help="verify destinations and print, send nothing")
    failures.set_defaults(handler=_cmd_dmarc_failures)
    dsummary = dmarc_sub.add_parser(
        "summary", help="per domain and sending source: volume and DMARC pass rates",
        description="Summarise the stored DMARC evaluations of the last N days per policy "
        "domain and sending source (From domain, IP): volume, DMARC/DKIM/SPF pass rates and "
        "dispositions, and whether every source passes (ready for p=reject). Started as root it "
        "runs as the store's owner. Exit status: 0 printed, 1 the store cannot be read, 2 a "
        "configuration error.")
    dsummary.add_argument("--days", type=positive_float, default=7.0, metavar="N",
                          help="the window, in days back from now (default: 7)")
    store_options(dsummary)
    dsummary.add_argument("--domain", metavar="D", help="only this policy domain")
    dsummary.add_argument("--json", action="store_true", help="print one JSON object")
    dsummary.set_defaults(handler=_cmd_dmarc_summary)
    add_ingest_command(dmarc_sub)


def _cmd_dmarc_check(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.orgdomain import Discovery, TemporaryError, fetch
    from mailwarden.dmarc.record import NotARecord, is_dmarc, parse

    dns = resolver_from(args)
    domain = args.domain.lower().rstrip(".")
    discovery = Discovery(dns, "legacy" if args.legacy else "rfc9989")
    problems: list[str] = []
    try:
        own = dns.txt(f"_dmarc.{domain}")
        texts = [t for t in own.records if is_dmarc(t)]
        if len(texts) > 1:
            problems.append(f"_dmarc.{domain} has {len(texts)} DMARC records: none applies")
        for text in texts:
            parsed = parse(text)
            if isinstance(parsed, NotARecord):
                problems.append(f"_dmarc.{domain}: {parsed.reason}")
        found = discovery.policy(domain)
        org = discovery.organizational_domain(domain)
        record = fetch(dns, found.domain) if found else None
    except TemporaryError as exc:
        print(f"mailwarden: DNS error: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL, as `dkim verify`: try again later
    if record is not None:
        problems.extend(record.warnings)
    summary = {
        "domain": domain, "organizational_domain": org,
        "policy_domain": found.domain if found else None,
        "record": record.text if record else None,
        "effective": {"p": record.p, "sp": record.sp, "np": record.np, "adkim": record.adkim,
                      "aspf": record.aspf, "psd": record.psd, "t": "y" if record.testing
                      else "n", "rua": list(record.rua), "ruf": list(record.ruf)}
        if record else None,
        "problems": problems, "queries": discovery.queries,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"domain:               {domain}")
    print(f"organizational domain: {org}")
    if record is None or found is None:
        print("policy:               none (no DMARC record found)")
    else:
        print(f"policy found at:      _dmarc.{found.domain}")
        print(f"record:               {record.text}")
        effective = summary["effective"]
        assert isinstance(effective, dict)
        print("effective:            " + "; ".join(f"{k}={v}" for k, v in effective.items()))
    for problem in problems:
        print(f"problem:              {problem}")
    return 0


def _report_setup(config: Any) -> tuple[Any, Resolver]:
    """The reporter settings (signing keys for the reporting address included) and the
    resolver, from the configuration: the same sending path for every kind of report."""
    from mailwarden.dkim.sign import SignOptions
    from mailwarden.dmarc.report import ReportSettings

    resolver = Resolver(nameservers=list(config.dns.nameservers) or system_nameservers(),
                        timeout=config.dns.timeout, lifetime=config.dns.lifetime)
    networks = tuple(str(net) for net in internal_networks(
        HostGroup.from_entries(name, entries) for name, entries in config.hosts.items()))
    settings = ReportSettings(**config.dmarc.reports, internal_networks=networks)
    signing = config.signing
    settings = dataclasses.replace(
        settings, signing_keys=signing.keys_for_author(settings.sender),
        sign_options=SignOptions(signing.headers, signing.oversign, signing.canonicalization))
    return settings, resolver


def _cmd_dmarc_report(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.sending import run_report_command

    config = load_config(args.config)
    if config is None:
        return 2
    if not config.dmarc.store or not config.dmarc.reports:
        print("mailwarden: dmarc.store and dmarc.reports must be configured", file=sys.stderr)
        return 2
    settings, resolver = _report_setup(config)
    become_store_owner(config.dmarc.store, config.user)
    return run_report_command(store_url=config.dmarc.store, settings=settings, dns=resolver,
                              period=args.period, dry_run=args.dry_run)


def _cmd_dmarc_failures(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.failures import send_failures
    from mailwarden.dmarc.sending import SendOutcome
    from mailwarden.dmarc.store import LockBusy, Store

    config = load_config(args.config)
    if config is None:
        return 2
    if config.dmarc.failure_reports is None:
        print("mailwarden: dmarc.failure_reports is not configured: no failure reports are "
              "made", file=sys.stderr)
        return 2
    settings, resolver = _report_setup(config)

    def locked_send(store: Store) -> list[SendOutcome] | None:
        try:
            with store.report_lock():
                return send_failures(store, settings, resolver, dry_run=args.dry_run)
        except LockBusy as exc:
            print(f"dmarc failures: {exc}; the next run sends them")
            return []
        except OSError as exc:
            print(f"dmarc failures: {exc}", file=sys.stderr)
            return None

    outcomes, status = on_store(config.dmarc.store, config.user, locked_send, create=True)
    if outcomes is None:
        return status or 1
    if not outcomes:
        print("no failure reports waiting")
    for item in outcomes:
        detail = f": {item.detail}" if item.detail else ""
        print(f"{item.status} {item.policy_domain} failure report {item.report_id} -> "
              f"{item.destination}{detail}")
    return 0 if all(item.ok for item in outcomes) else 1


def _cmd_dmarc_summary(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.summary import format_text, summarize, to_json

    domains, status = with_store(
        args, lambda store: summarize(store, args.days, policy_domain=args.domain))
    if domains is None:
        return status
    if args.json:
        print(json.dumps(to_json(domains, args.days), indent=2))
    else:
        print(format_text(domains, args.days))
    return 0
