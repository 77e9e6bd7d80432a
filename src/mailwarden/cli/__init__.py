"""The `mailwarden` command line: one subcommand per job, human text or JSON (--json)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mailwarden import __version__, textout
from mailwarden.cli.common import (
    DEFAULT_CONFIG,
    config_option,
    ip_argument,
    load_config,
    nameserver_argument,
    positive_float,
    read_message,
)
from mailwarden.cli.dkim import add_dkim_commands
from mailwarden.cli.dmarc import add_dmarc_commands
from mailwarden.cli.logs import add_log_commands
from mailwarden.cli.migrate import add_import_commands
from mailwarden.dns import Nameserver, Resolver, system_nameservers
from mailwarden.spf import Limits, SPFResult, check_helo, check_mailfrom
from mailwarden.startchecks import preflight
from mailwarden.textout import shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailwarden",
        description="Mail-authentication milter (SPF, DKIM, DMARC, ARC, relay policy) for "
        "Postfix and Sendmail, and its tools. Commands that read the configuration take "
        f"--config (default: {DEFAULT_CONFIG}); `mailwarden COMMAND --help` for each.",
    )
    parser.add_argument("--version", action="version", version=f"mailwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    spf = commands.add_parser(
        "spf", help="evaluate SPF (RFC 7208) for a client IP, sender and HELO name",
        description="Evaluate SPF (RFC 7208) for one SMTP transaction, as the daemon's spf "
        "check does, and print the result, the reason, every DNS lookup and the "
        "Received-SPF field. Exit status: 0 whatever the SPF result, 2 a usage error.",
    )
    spf.add_argument("--ip", required=True, type=ip_argument, help="the SMTP client's IP address")
    spf.add_argument("--mail-from", "--sender", dest="sender", required=True, metavar="ADDR",
                     help='the MAIL FROM address, as for `test` ("" for the null reverse-path); '
                     '--sender is the older name')
    spf.add_argument("--helo", required=True, help="the HELO/EHLO name")
    spf.add_argument("--identity", choices=("mailfrom", "helo"), default="mailfrom",
                     help="which identity to check (default: mailfrom)")
    spf.add_argument("--nameserver", action="append", type=nameserver_argument, default=None,
                     metavar="HOST[:PORT]",
                     help="DNS server to ask (repeatable; default: /etc/resolv.conf)")
    spf.add_argument("--timeout", type=positive_float, default=2.0, metavar="S",
                     help="seconds to wait for one DNS answer (default: 2)")
    spf.add_argument("--budget", type=positive_float, default=20.0, metavar="S",
                     help="wall-clock limit for the whole evaluation (default: 20)")
    spf.add_argument("--receiver", default="unknown",
                     help="this host's name, for %%{r} and Received-SPF (default: unknown)")
    spf.add_argument("--json", action="store_true", help="print one JSON object")
    spf.set_defaults(handler=_cmd_spf)

    run = commands.add_parser(
        "run", help="run the milter daemon",
        description="Run the milter daemon in the foreground (systemd: Type=notify). Started "
        "as root it binds the socket, then drops to `user`/`group` of the configuration. "
        "SIGHUP reloads the configuration (a broken one is refused and the running one kept); "
        "SIGTERM stops taking connections and lets those in progress finish within "
        "drain_timeout. Exit status: 0 stopped, 1 could not start, 2 a configuration error.")
    config_option(run)
    run.set_defaults(handler=_cmd_run)

    test = commands.add_parser(
        "test", help="judge a message file with the configured policy, as the daemon would",
        description="Run the whole configured policy on a message file exactly as the daemon "
        "would (same engine, same rules, the milter stages in order) and print each stage's "
        "checks and results, the verdict with its SMTP reply, and the headers that would be "
        "added or removed. DNS is queried live; the DMARC store is not written. Exit status: 0 "
        "whatever the verdict, 1 the file cannot be read, 2 a configuration error.",
    )
    test.add_argument("file", metavar="FILE.eml", help="the message, - for standard input")
    test.add_argument("--ip", required=True, type=ip_argument, help="the SMTP client's IP address")
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
    config_option(test)
    test.add_argument("--nameserver", action="append", type=nameserver_argument, default=None,
                      metavar="HOST[:PORT]",
                      help="DNS server to ask instead of the configured ones (repeatable)")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.set_defaults(handler=_cmd_test)

    check = commands.add_parser(
        "check-config", help="validate a configuration and print the effective policy",
        description="Validate a configuration file and make every start-up check `run` makes "
        "(users and groups, socket directory, keys and configuration readable by the "
        "daemon's user, the DMARC store), then print the effective configuration and policy "
        "with the replies each rule sends, and warnings about traps (an `accept` that skips "
        "later checks, an unreachable log socket). Exit status: 0 `run` would start (with or "
        "without warnings), 1 it would not: the error is printed with its file, line and key.",
    )
    check.add_argument("path", nargs="?", default=None, metavar="PATH",
                       help="configuration file, the same as --config")
    check.add_argument("--config", metavar="PATH",
                       help=f"configuration file, as for the other commands (default: "
                       f"{DEFAULT_CONFIG})")
    check.add_argument("--json", action="store_true", help="print the policy as JSON")
    check.set_defaults(handler=_cmd_check_config)

    add_dkim_commands(commands)
    add_dmarc_commands(commands)
    add_log_commands(commands)
    add_import_commands(commands)
    return parser


def _cmd_test(args: argparse.Namespace) -> int:
    from mailwarden.offline import (
        Envelope,
        format_report,
        offline_config,
        offline_runtime,
        quiet_logging,
        run_offline,
    )

    raw = read_message(args.file)
    config = load_config(args.config)
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
    from mailwarden.logsetup import log_warnings
    from mailwarden.policy.describe import effective_policy, format_policy
    from mailwarden.policy.traps import accept_traps

    path = args.config or args.path or DEFAULT_CONFIG
    config = load_config(path)
    if config is None:
        return 1
    policy = effective_policy(config)
    # what `run` checks before it serves, as the daemon's user: a problem here would be a
    # refused start (under systemd, a restart loop)
    problems, store_text = preflight(config, path)
    warnings = accept_traps(config) + log_warnings(config)
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
