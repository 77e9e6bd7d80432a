"""The `mailwarden` command line: one subcommand per job, human text or JSON (--json)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mailwarden import __version__, textout
from mailwarden.config import Config
from mailwarden.dns import Nameserver, Resolver, parse_nameserver, system_nameservers
from mailwarden.relay import HostGroup
from mailwarden.results import Result
from mailwarden.spf import Limits, SPFResult, check_helo, check_mailfrom
from mailwarden.startchecks import preflight
from mailwarden.storeowner import become_store_owner
from mailwarden.textout import shown


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _nameserver(text: str) -> Nameserver:
    try:
        return parse_nameserver(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailwarden", description="Mail-authentication milter and its tools."
    )
    parser.add_argument("--version", action="version", version=f"mailwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    spf = commands.add_parser(
        "spf", help="evaluate SPF (RFC 7208) for a client IP, sender and HELO name",
        description="Evaluate SPF for one SMTP transaction. Exits 0 whatever the SPF result; "
        "non-zero only on a usage error.",
    )
    spf.add_argument("--ip", required=True, type=_ip, help="the SMTP client's IP address")
    spf.add_argument("--mail-from", "--sender", dest="sender", required=True, metavar="ADDR",
                     help='the MAIL FROM address, as for `test` ("" for the null reverse-path); '
                     '--sender is the older name')
    spf.add_argument("--helo", required=True, help="the HELO/EHLO name")
    spf.add_argument("--identity", choices=("mailfrom", "helo"), default="mailfrom",
                     help="which identity to check (default: mailfrom)")
    spf.add_argument("--nameserver", action="append", type=_nameserver, default=None,
                     metavar="HOST[:PORT]",
                     help="DNS server to ask (repeatable; default: /etc/resolv.conf)")
    spf.add_argument("--timeout", type=_positive_float, default=2.0, metavar="S",
                     help="seconds to wait for one DNS answer (default: 2)")
    spf.add_argument("--budget", type=_positive_float, default=20.0, metavar="S",
                     help="wall-clock limit for the whole evaluation (default: 20)")
    spf.add_argument("--receiver", default="unknown",
                     help="this host's name, for %%{r} and Received-SPF (default: unknown)")
    spf.add_argument("--json", action="store_true", help="print one JSON object")
    spf.set_defaults(handler=_cmd_spf)

    run = commands.add_parser("run", help="run the milter daemon",
                              description="Run the milter daemon in the foreground.")
    run.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                     help=f"configuration file (default: {DEFAULT_CONFIG})")
    run.set_defaults(handler=_cmd_run)

    test = commands.add_parser(
        "test", help="judge a message file with the configured policy, as the daemon would",
        description="Run the whole configured policy on a message file exactly as the daemon "
        "would (same engine, same rules, the milter stages in order) and print each stage's "
        "checks and results, the verdict with its SMTP reply, and the headers that would be "
        "added or removed. DNS is queried live; the DMARC store is not written. Exits 0 "
        "whatever the verdict; 1 if the file cannot be read, 2 on a configuration error.",
    )
    test.add_argument("file", metavar="FILE.eml")
    test.add_argument("--ip", required=True, type=_ip, help="the SMTP client's IP address")
    test.add_argument("--helo", required=True, help="the HELO/EHLO name the client gave")
    test.add_argument("--mail-from", required=True, metavar="ADDR",
                      help='the MAIL FROM address ("" for the null reverse-path)')
    test.add_argument("--rcpt", required=True, action="append", metavar="ADDR",
                      help="a RCPT TO address (repeatable)")
    test.add_argument("--client-name", default="unknown", metavar="NAME",
                      help="the client's verified host name as the MTA reports it "
                      "(default: unknown)")
    test.add_argument("--auth-user", default="", metavar="LOGIN",
                      help="treat the client as SMTP-AUTH authenticated as LOGIN")
    test.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                      help=f"configuration file (default: {DEFAULT_CONFIG})")
    test.add_argument("--nameserver", action="append", type=_nameserver, default=None,
                      metavar="HOST[:PORT]",
                      help="DNS server to ask instead of the configured ones (repeatable)")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.set_defaults(handler=_cmd_test)

    check = commands.add_parser(
        "check-config", help="validate a configuration and print the effective policy",
        description="Validate a configuration file; print the effective policy, or the error "
        "with its file, line and key (exit status 1).",
    )
    check.add_argument("path", nargs="?", default=None, metavar="PATH")
    check.add_argument("--config", metavar="PATH",
                       help=f"configuration file, as for the other commands (default: "
                       f"{DEFAULT_CONFIG})")
    check.add_argument("--json", action="store_true", help="print the policy as JSON")
    check.set_defaults(handler=_cmd_check_config)

    dkim_cmd = commands.add_parser("dkim", help="DKIM keys, signing and verification")
    dkim_sub = dkim_cmd.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    genkey = dkim_sub.add_parser("genkey", help="write a new private key (mode 0600) and print "
                                 "its DNS record")
    genkey.add_argument("--domain", required=True)
    genkey.add_argument("--selector", required=True)
    genkey.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    genkey.add_argument("--bits", type=int, default=2048)
    genkey.add_argument("--out", metavar="PATH",
                        help="key file (default: DOMAIN.SELECTOR.TYPE.pem here)")
    genkey.add_argument("--owner", metavar="USER",
                        help="run as root: the key's owner (default: the `user` of --config)")
    genkey.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"configuration whose `user` gets the key when run as root "
                        f"(default: {DEFAULT_CONFIG})")
    genkey.set_defaults(handler=_cmd_dkim_genkey)
    checkdns = dkim_sub.add_parser("check-dns", help="does the published record match the key?")
    checkdns.add_argument("--domain", required=True)
    checkdns.add_argument("--selector", required=True)
    checkdns.add_argument("--key", required=True, metavar="PATH")
    _dns_options(checkdns)
    checkdns.set_defaults(handler=_cmd_dkim_check_dns)
    verify = dkim_sub.add_parser(
        "verify", help="verify the DKIM signatures of a message file",
        description="Verify every DKIM-Signature of a message (FILE.eml, or - for standard "
        "input) and print one result per signature. Exit status: 0 when one passes, 1 when "
        "none does (or the message is unsigned), 75 when a key could not be fetched just now.")
    verify.add_argument("file", metavar="FILE.eml")
    _dns_options(verify)
    verify.set_defaults(handler=_cmd_dkim_verify)
    sign = dkim_sub.add_parser("sign", help="sign a message file; prints the signed message",
                               description="Sign a message (FILE.eml, or - for standard "
                               "input) and print it signed.")
    sign.add_argument("file", metavar="FILE.eml")
    sign.add_argument("--domain", required=True)
    sign.add_argument("--selector", required=True)
    sign.add_argument("--key", required=True, metavar="PATH")
    sign.add_argument("--canonicalization", default="relaxed/relaxed",
                      choices=("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                               "simple/simple"))
    sign.add_argument("--json", action="store_true", help="print the header as JSON")
    sign.set_defaults(handler=_cmd_dkim_sign)

    dmarc_cmd = commands.add_parser("dmarc", help="DMARC policy checks and aggregate reports")
    dmarc_sub = dmarc_cmd.add_subparsers(dest="dmarc_command", required=True, metavar="COMMAND")
    dcheck = dmarc_sub.add_parser("check", help="show a domain's effective DMARC policy and "
                                  "every problem in its record")
    dcheck.add_argument("domain")
    dcheck.add_argument("--legacy", action="store_true",
                        help="RFC 7489 Public Suffix List instead of the RFC 9989 tree walk")
    _dns_options(dcheck)
    dcheck.set_defaults(handler=_cmd_dmarc_check)
    report = dmarc_sub.add_parser("report", help="build and send RFC 9990 aggregate reports")
    report.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH")
    report.add_argument("--period", default="yesterday",
                        help='"yesterday" (default), "last-hour", or START..END (ISO 8601)')
    report.add_argument("--dry-run", action="store_true", help="build, print, send nothing")
    report.set_defaults(handler=_cmd_dmarc_report)
    dsummary = dmarc_sub.add_parser(
        "summary", help="per domain and sending source: volume and DMARC pass rates",
        description="Summarise the stored DMARC evaluations of the last N days per policy "
        "domain and sending source (From domain, IP): volume, DMARC/DKIM/SPF pass rates and "
        "dispositions, and whether every source passes (ready for p=reject).")
    dsummary.add_argument("--days", type=_positive_float, default=7.0, metavar="N",
                          help="the window, in days back from now (default: 7)")
    dsummary.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                          help="configuration file whose dmarc.store is read "
                          f"(default: {DEFAULT_CONFIG})")
    dsummary.add_argument("--store", metavar="URL", help="the store (instead of the config's)")
    dsummary.add_argument("--domain", metavar="D", help="only this policy domain")
    dsummary.add_argument("--json", action="store_true", help="print one JSON object")
    dsummary.set_defaults(handler=_cmd_dmarc_summary)
    return parser


def _cmd_dmarc_check(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.orgdomain import Discovery, TemporaryError, fetch
    from mailwarden.dmarc.record import NotARecord, is_dmarc, parse

    dns = _resolver(args)
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
        return 1
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


def _load_config(path: str) -> Config | None:
    """The configuration, or None after printing its error (file:line: key: message)."""
    from mailwarden.config import ConfigError
    from mailwarden.config.build import load

    try:
        return load(path)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return None


def _cmd_dmarc_report(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.report import ReportSettings
    from mailwarden.dmarc.sending import run_report_command

    config = _load_config(args.config)
    if config is None:
        return 2
    if not config.dmarc.store or not config.dmarc.reports:
        print("mailwarden: dmarc.store and dmarc.reports must be configured", file=sys.stderr)
        return 2
    resolver = Resolver(nameservers=list(config.dns.nameservers) or system_nameservers(),
                        timeout=config.dns.timeout, lifetime=config.dns.lifetime)
    networks = tuple(str(net) for name, entries in config.hosts.items()
                     for net in HostGroup.from_entries(name, entries).networks)
    settings = ReportSettings(**config.dmarc.reports, internal_networks=networks)
    become_store_owner(config.dmarc.store, config.user)
    return run_report_command(store_url=config.dmarc.store, settings=settings, dns=resolver,
                              period=args.period, dry_run=args.dry_run)


def _cmd_dmarc_summary(args: argparse.Namespace) -> int:
    from mailwarden.dmarc.store import Store, StoreError
    from mailwarden.dmarc.summary import format_text, summarize, to_json

    url, user = args.store, None
    if url is None:
        config = _load_config(args.config)
        if config is None:
            return 1
        url, user = config.dmarc.store, config.user
        if not url:
            print(f"mailwarden: {args.config}: no dmarc.store configured (or give --store)",
                  file=sys.stderr)
            return 1
    become_store_owner(url, user)
    try:
        store = Store.open_existing(url)  # reading never creates a store
        try:
            domains = summarize(store, args.days, policy_domain=args.domain)
        finally:
            store.close()
    except (StoreError, ValueError) as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(domains, args.days), indent=2))
    else:
        print(format_text(domains, args.days))
    return 0


def _dns_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nameserver", action="append", type=_nameserver, default=None,
                        metavar="HOST[:PORT]", help="DNS server (default: /etc/resolv.conf)")
    parser.add_argument("--timeout", type=_positive_float, default=2.0, metavar="S")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _resolver(args: argparse.Namespace) -> Resolver:
    servers: list[Nameserver] = args.nameserver or system_nameservers()
    return Resolver(nameservers=servers, timeout=args.timeout, lifetime=2 * args.timeout)


def _read_message(path: str) -> bytes:
    """The message file, or standard input for "-"."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"mailwarden: cannot read {path}: {exc.strerror}") from None


def _key_owner(args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """Run as root, a new key goes to the daemon's user (`--owner`, else the `user` of the
    configuration): a root-owned 0600 key is one the daemon cannot read and refuses."""
    import pwd

    if os.geteuid() != 0:
        return None, ""
    name = args.owner
    if name is None and Path(args.config).is_file():
        config = _load_config(args.config)
        name = config.user if config is not None else None
    if not name or name == "root":
        return None, ""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SystemExit(f"mailwarden: no user {name!r} to give the key to") from None
    return (entry.pw_uid, entry.pw_gid), name


def _cmd_dkim_genkey(args: argparse.Namespace) -> int:
    from mailwarden.dkim.keys import generate, public_record, write_private, zone_record

    path = args.out or f"{args.domain}.{args.selector}.{args.type}.pem"
    owner, whom = _key_owner(args)
    try:
        key = generate(args.type, args.bits)
        write_private(key, path, owner)
    except ValueError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mailwarden: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"; private key written to {path} (mode 0600{', owner ' + whom if whom else ''})")
    print(zone_record(f"{args.selector}._domainkey.{args.domain}", public_record(key)))
    return 0


def _cmd_dkim_check_dns(args: argparse.Namespace) -> int:
    from mailwarden.dkim.keys import KeyError_, check_dns, load_key

    try:
        key = load_key(args.domain, args.selector, args.key, allow_group_readable=True)
    except KeyError_ as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    found = check_dns(_resolver(args), key)
    if args.json:
        print(json.dumps({"ok": found.ok, "message": found.message, "name": key.dns_name}))
    else:
        print(("OK: " if found.ok else "MISMATCH: ") + found.message)
    return 0 if found.ok else 1


def _cmd_dkim_verify(args: argparse.Namespace) -> int:
    import dataclasses

    from mailwarden.dkim.verify import verify_message

    results = verify_message(_read_message(args.file), _resolver(args))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    elif not results:
        print("dkim=none (no DKIM-Signature)")
    else:
        for r in results:
            print(f"dkim={r.result} header.d={r.domain} header.s={r.selector} "
                  f"header.a={r.algorithm} header.b={r.b}: {r.reason}")
    if any(r.result is Result.PASS for r in results):
        return 0
    # 75 (EX_TEMPFAIL): a key could not be fetched just now, try again
    return 75 if any(r.result is Result.TEMPERROR for r in results) else 1


def _cmd_dkim_sign(args: argparse.Namespace) -> int:
    import dkim as dkimpy

    from mailwarden.dkim.keys import KeyError_, load_key
    from mailwarden.dkim.sign import SignOptions, sign_message

    message = _read_message(args.file)
    try:
        key = load_key(args.domain, args.selector, args.key)
        header, _, body = args.canonicalization.partition("/")
        fields = sign_message(message, [key], SignOptions(canonicalization=(header, body)))
    except (KeyError_, dkimpy.DKIMException) as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    lines = "".join(f"{name}:{value.replace(chr(10), chr(13) + chr(10))}\r\n"
                    for name, value in fields)
    if args.json:
        print(json.dumps({"headers": [{"name": n, "value": v} for n, v in fields]}))
    else:
        sys.stdout.buffer.write(lines.encode() + message)
    return 0


# Where a Debian administrator keeps it (docs/migrating.md); the example is passed explicitly
DEFAULT_CONFIG = "/etc/mailwarden/mailwarden.yaml"


def _cmd_test(args: argparse.Namespace) -> int:
    from mailwarden.offline import (
        Envelope,
        format_report,
        offline_config,
        offline_runtime,
        quiet_logging,
        run_offline,
    )

    raw = _read_message(args.file)
    config = _load_config(args.config)
    if config is None:
        return 2
    quiet_logging()
    runtime = offline_runtime(offline_config(config, args.nameserver))
    envelope = Envelope(args.ip, args.helo, args.mail_from, tuple(args.rcpt),
                        args.client_name, args.auth_user)
    report = run_offline(runtime, raw, envelope)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mailwarden.daemon import run

    return run(args.config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from mailwarden.policy.describe import effective_policy, format_policy
    from mailwarden.policy.traps import accept_traps

    path = args.config or args.path or DEFAULT_CONFIG
    config = _load_config(path)
    if config is None:
        return 1
    policy = effective_policy(config)
    # what `run` checks before it serves, as the daemon's user: a problem here would be a
    # refused start (under systemd, a restart loop)
    problems, store_text = preflight(config, path)
    warnings = accept_traps(config)
    if args.json:
        policy["store"] = store_text
        policy["problems"] = problems
        policy["warnings"] = warnings
        print(json.dumps(policy, indent=2))
    else:
        print(format_policy(policy))
        if store_text:
            print(f"DMARC store: {store_text}")
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print("OK: mailwarden run would start with this configuration")
    return 1 if problems else 0


def _cmd_spf(args: argparse.Namespace) -> int:
    servers: list[Nameserver] = args.nameserver or system_nameservers()
    resolver = Resolver(nameservers=servers, timeout=args.timeout,
                        lifetime=max(args.timeout, min(args.budget, 2 * args.timeout)))
    limits = Limits(budget=args.budget)
    if args.identity == "helo":
        result = check_helo(resolver, args.ip, args.helo, receiver=args.receiver, limits=limits)
    else:
        result = check_mailfrom(resolver, args.ip, args.sender, args.helo,
                                receiver=args.receiver, limits=limits)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_spf(result, limits))
    return 0


def format_spf(result: SPFResult, limits: Limits) -> str:
    """A readable report of one evaluation."""
    lines = [
        f"SPF {result.result} for {result.identity} identity {result.sender} "
        f"(domain {result.domain}) from {result.ip}",
        f"  mechanism:    {result.mechanism or '-'}",
        f"  cause:        {result.cause}",
        f"  explanation:  {result.explanation if result.explanation is not None else '-'}",
        f"  DNS lookups:  {result.lookups} of {limits.dns_terms}; "
        f"void lookups: {result.void_lookups} of {limits.void_lookups}; "
        f"DNSSEC-authentic: {'yes' if result.authentic else 'no'}",
        f"Received-SPF: {result.received_spf}",
    ]
    return "\n".join(shown(line) for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.handler is not _cmd_run:  # the daemon's log lines are made printable already
        textout.install()
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
