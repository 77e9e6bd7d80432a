"""`mailwarden dkim`: genkey, check-dns, verify, sign."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mailwarden.cli.common import (
    config_option,
    dns_options,
    load_config,
    read_message,
    resolver_from,
)
from mailwarden.identity import ids_of
from mailwarden.results import Result


def add_dkim_commands(commands: Any) -> None:
    dkim_cmd = commands.add_parser(
        "dkim", help="DKIM keys, signing and verification",
        description="DKIM (RFC 6376) tools: make a signing key and its DNS record, check the "
        "published record against the key, verify or sign a message file.")
    dkim_sub = dkim_cmd.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    genkey = dkim_sub.add_parser(
        "genkey", help="write a new private key (mode 0600) and print its DNS record",
        description="Generate a signing key, write it as PEM (mode 0600; run as root, owned "
        "by the daemon's user, so that the daemon can read it) and print the TXT record to "
        "publish at SELECTOR._domainkey.DOMAIN. Exit status: 0 written, 2 the key or its "
        "file could not be made.")
    genkey.add_argument("--domain", required=True, help="the signing domain (d=)")
    genkey.add_argument("--selector", required=True, help="the selector (s=)")
    genkey.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                        help="key type: rsa (rsa-sha256) or ed25519 (ed25519-sha256, RFC 8463) "
                        "(default: rsa)")
    genkey.add_argument("--bits", type=int, default=2048,
                        help="RSA key size, 1024 bits at least (RFC 8301) (default: 2048)")
    genkey.add_argument("--out", metavar="PATH",
                        help="key file (default: DOMAIN.SELECTOR.TYPE.pem here)")
    genkey.add_argument("--owner", metavar="USER",
                        help="run as root: the key's owner (default: the `user` of --config)")
    config_option(genkey, "configuration whose `user` gets the key when run as root")
    genkey.set_defaults(handler=_cmd_dkim_genkey)
    checkdns = dkim_sub.add_parser(
        "check-dns", help="does the published record match the key?",
        description="Look up SELECTOR._domainkey.DOMAIN and compare its public key with the "
        "private key file; with --all, do so for every key of the configuration, staged ones "
        "included (as opendkim-testkey over the whole KeyTable). Exit status: 0 they match "
        "(with --all: every active key; a staged key not yet published is reported, not "
        "counted), 1 one does not (or has no record), 2 a key file or the configuration "
        "cannot be read, 75 a lookup failed for now.")
    checkdns.add_argument("--domain", help="the signing domain (d=)")
    checkdns.add_argument("--selector", help="the selector (s=)")
    checkdns.add_argument("--key", metavar="PATH", help="the private key file")
    checkdns.add_argument("--all", action="store_true",
                          help="every key of --config's signing.keys instead")
    config_option(checkdns, "configuration file, for --all")
    dns_options(checkdns)
    checkdns.set_defaults(handler=_cmd_dkim_check_dns, parser=checkdns)
    verify = dkim_sub.add_parser(
        "verify", help="verify the DKIM signatures of a message file",
        description="Verify every DKIM-Signature of a message (FILE.eml, or - for standard "
        "input) and print one result per signature. Exit status: 0 when one passes, 1 when "
        "none does (or the message is unsigned), 75 when a key could not be fetched just now.")
    verify.add_argument("file", metavar="FILE.eml", help="the message, - for standard input")
    dns_options(verify)
    verify.set_defaults(handler=_cmd_dkim_verify)
    sign = dkim_sub.add_parser("sign", help="sign a message file; prints the signed message",
                               description="Sign a message (FILE.eml, or - for standard "
                               "input) with the daemon's signing code and print it signed. "
                               "Exit status: 0 signed, 2 the key cannot be used or the "
                               "message cannot be signed.")
    sign.add_argument("file", metavar="FILE.eml", help="the message, - for standard input")
    sign.add_argument("--domain", required=True, help="the signing domain (d=)")
    sign.add_argument("--selector", required=True, help="the selector (s=)")
    sign.add_argument("--key", required=True, metavar="PATH", help="the private key file")
    sign.add_argument("--canonicalization", default="relaxed/relaxed",
                      choices=("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                               "simple/simple"),
                      help="header/body canonicalization (default: relaxed/relaxed)")
    sign.add_argument("--json", action="store_true", help="print the header as JSON")
    sign.set_defaults(handler=_cmd_dkim_sign)



def _key_owner(args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """Run as root, a new key goes to the daemon's user (`--owner`, else the `user` of the
    configuration): a root-owned 0600 key is one the daemon cannot read and refuses."""
    if os.geteuid() != 0:
        return None, ""
    name = args.owner
    if name is None and Path(args.config).is_file():
        config = load_config(args.config)
        name = config.user if config is not None else None
    if not name or name == "root":
        return None, ""
    ids = ids_of(name)
    if ids is None:
        raise SystemExit(f"mailwarden: no user {name!r} to give the key to")
    return ids, name


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

    if args.all:
        config = load_config(args.config)
        if config is None:
            return 2
        keys = list(config.signing.keys)
    elif args.domain and args.selector and args.key:
        try:
            keys = [load_key(args.domain, args.selector, args.key, allow_group_readable=True)]
        except KeyError_ as exc:
            print(f"mailwarden: {exc}", file=sys.stderr)
            return 2
    else:
        args.parser.error("give --domain, --selector and --key, or --all")
    dns = resolver_from(args)
    found = [(key, check_dns(dns, key)) for key in keys]
    rows = [{"name": k.dns_name, "key": k.path, "staged": k.staged, "ok": f.ok,
             "temporary": f.temporary, "message": f.message} for k, f in found]
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=2 if args.all else None))
    else:
        for key, result in found:
            verdict = "OK" if result.ok else "DNS ERROR" if result.temporary else "MISMATCH"
            state = " (staged)" if key.staged else ""
            named = f"{key.domain}/{key.selector}{state}: " if args.all else ""
            print(f"{verdict}: {named}{result.message}")
    failed = [f for k, f in found if not f.ok and not k.staged]
    if any(not f.temporary for f in failed):
        return 1
    return 75 if failed else 0


def _cmd_dkim_verify(args: argparse.Namespace) -> int:
    import dataclasses

    from mailwarden.dkim.verify import verify_message

    results = verify_message(read_message(args.file), resolver_from(args))
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

    message = read_message(args.file)
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
