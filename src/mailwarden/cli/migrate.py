"""`mailwarden import opendkim`: an OpenDKIM (+ OpenDMARC) set-up as a mailwarden
configuration."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from mailwarden.cli.common import DEFAULT_CONFIG


def add_import_commands(commands: Any) -> None:
    group = commands.add_parser(
        "import", help="convert another milter's configuration",
        description="Convert the configuration of the milters mailwarden replaces.")
    sub = group.add_subparsers(dest="import_command", required=True, metavar="COMMAND")
    opendkim = sub.add_parser(
        "opendkim", help="opendkim.conf (and opendmarc.conf) to mailwarden YAML",
        description="Read opendkim.conf, the KeyTable, SigningTable (plain or refile:) and "
        "host lists it names, and with --opendmarc opendmarc.conf, and print the mailwarden "
        "configuration that does the same on standard output; every setting that could not "
        "be carried over is named on standard error with its file, line and why. Save the "
        f"output as {DEFAULT_CONFIG}, review it, then run `mailwarden check-config`. Exit "
        "status: 0 converted, 2 a file cannot be read or uses a data set that cannot be "
        "imported (db:, ldap:, dsn:, lua:).")
    opendkim.add_argument("opendkim_conf", metavar="OPENDKIM.CONF",
                          help="OpenDKIM's configuration, e.g. /etc/opendkim.conf")
    opendkim.add_argument("--opendmarc", metavar="OPENDMARC.CONF",
                          help="OpenDMARC's configuration too, e.g. /etc/opendmarc.conf")
    opendkim.add_argument("--hostname", default=socket.getfqdn(), metavar="NAME",
                          help="authserv_id when AuthservID is HOSTNAME or unset "
                          "(default: this host's name)")
    opendkim.set_defaults(handler=_cmd_import_opendkim)


def _cmd_import_opendkim(args: argparse.Namespace) -> int:
    from mailwarden.migrate.opendkim import ImportError_, import_opendkim, render

    try:
        imported = import_opendkim(args.opendkim_conf, args.opendmarc, args.hostname)
    except ImportError_ as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    sources = [args.opendkim_conf, *([args.opendmarc] if args.opendmarc else [])]
    sys.stdout.write(render(imported, sources))
    for note in imported.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
