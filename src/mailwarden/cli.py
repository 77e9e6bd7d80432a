"""The `mailwarden` command line: one subcommand per job, human text or JSON (--json)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence

from mailwarden import __version__
from mailwarden.dns import Nameserver, Resolver, parse_nameserver, system_nameservers
from mailwarden.spf import Limits, SPFResult, check_helo, check_mailfrom


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
    spf.add_argument("--sender", required=True,
                     help='MAIL FROM address; "" for the null reverse-path (<>)')
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

    check = commands.add_parser(
        "check-config", help="validate a configuration and print the effective policy",
        description="Validate a configuration file; print the effective policy, or the error "
        "with its file, line and key (exit status 1).",
    )
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG, metavar="PATH")
    check.add_argument("--json", action="store_true", help="print the policy as JSON")
    check.set_defaults(handler=_cmd_check_config)
    return parser


DEFAULT_CONFIG = "conf/mailwarden.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    from mailwarden.daemon import run

    return run(args.config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from mailwarden.config import ConfigError, load
    from mailwarden.policy.describe import effective_policy, format_policy

    try:
        config = load(args.path)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 1
    policy = effective_policy(config)
    print(json.dumps(policy, indent=2) if args.json else format_policy(policy))
    return 0


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
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
