"""What the subcommands share: the default configuration path, argument types, loading the
configuration, the DNS options and resolver, reading a message file (or standard input)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mailwarden.config import Config
from mailwarden.dns import Nameserver, Resolver, parse_nameserver, system_nameservers

if TYPE_CHECKING:
    from mailwarden.dmarc.store import Store

T = TypeVar("T")

# Where a Debian administrator keeps it (docs/migrating.md); the example is passed explicitly
DEFAULT_CONFIG = "/etc/mailwarden/mailwarden.yaml"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def ip_argument(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def nameserver_argument(text: str) -> Nameserver:
    try:
        return parse_nameserver(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dns_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nameserver", action="append", type=nameserver_argument, default=None,
                        metavar="HOST[:PORT]", help="DNS server (default: /etc/resolv.conf)")
    parser.add_argument("--timeout", type=positive_float, default=2.0, metavar="S",
                        help="seconds to wait for one DNS answer (default: 2)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def resolver_from(args: argparse.Namespace) -> Resolver:
    servers: list[Nameserver] = args.nameserver or system_nameservers()
    return Resolver(nameservers=servers, timeout=args.timeout, lifetime=2 * args.timeout)


def load_config(path: str) -> Config | None:
    """The configuration, or None after printing its error (file:line: key: message)."""
    from mailwarden.config import ConfigError
    from mailwarden.config.build import load

    try:
        return load(path)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return None


def read_message(path: str) -> bytes:
    """The message file, or standard input for "-"."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"mailwarden: cannot read {path}: {exc.strerror}") from None


def config_option(parser: argparse.ArgumentParser, what: str = "configuration file") -> None:
    """--config PATH, the same name and default on every command that reads it."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"{what} (default: {DEFAULT_CONFIG})")


def store_options(parser: argparse.ArgumentParser) -> None:
    """--config and --store: where a command reading the DMARC store finds it."""
    config_option(parser, "configuration file whose dmarc.store is used")
    parser.add_argument("--store", metavar="URL", help="the store (instead of the config's)")


def with_store(args: argparse.Namespace, work: Callable[[Store], T], *,
               create: bool = False) -> tuple[T | None, int]:
    """`work` on the DMARC store of --store or --config (as the store's owner when started
    as root; `create`: a missing store is made, else reading never creates one), then
    closed: (its result, 0), or (None, the exit status) after printing the error: 2 for the
    configuration, 1 for the store."""
    url, user = args.store, None
    if url is None:
        config = load_config(args.config)
        if config is None:
            return None, 2
        url, user = config.dmarc.store, config.user
        if not url:
            print(f"mailwarden: {args.config}: no dmarc.store configured (or give --store)",
                  file=sys.stderr)
            return None, 2
    return on_store(url, user, work, create=create)


def on_store(url: str, user: str | None, work: Callable[[Store], T], *,
             create: bool = False) -> tuple[T | None, int]:
    """`work` on the DMARC store at `url` (as the store's owner when started as root), then
    closed: (its result, 0), or (None, 1) after printing the store's error."""
    from mailwarden.dmarc.store import Store, StoreError
    from mailwarden.storeowner import become_store_owner

    become_store_owner(url, user)
    try:
        store = Store.open(url) if create else Store.open_existing(url)
        try:
            return work(store), 0
        finally:
            store.close()
    except (StoreError, ValueError) as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return None, 1

