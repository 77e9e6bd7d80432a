"""OpenDKIM (and OpenDMARC) configurations to a mailwarden configuration: what can be
carried over is, and every setting that cannot is reported with the reason.

The result mirrors what the old stack did: OpenDKIM signs for internal and authenticated
clients and verifies the rest; OpenDMARC evaluates the rest and rejects only with
RejectFailures; SPF is evaluated for DMARC, not enforced (that was the SPF policy daemon's
job, which mailwarden's `spf` rule can take over by dropping its `on:`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import yaml

from mailwarden.dkim.table import covers, normalize
from mailwarden.migrate.conffile import (
    DataSet,
    ImportError_,
    Settings,
    data_set,
    name_value,
    read_settings,
)
from mailwarden.relay import check_host_entry

# Why a setting has no place in mailwarden's configuration (lower-cased names).
NOT_NEEDED = {
    "pidfile": "mailwarden runs in the foreground under systemd: no PID file",
    "background": "mailwarden runs in the foreground under systemd",
    "autorestart": "systemd restarts mailwarden (Restart=on-failure)",
    "autorestartrate": "systemd restarts mailwarden (Restart=on-failure)",
    "syslog": "the log goes to the journal, or to syslog with log.target (facility mail)",
    "syslogsuccess": "every decision is logged, one line each (docs/logging.md)",
    "syslogfacility": "log.facility (mail by default) with log.target: syslog",
    "logwhy": "the decision line always gives the reason",
    "logresults": "the decision line always gives every result",
    "trustanchorfile": "DNSSEC is the resolver's business (dns.nameservers)",
    "publicsuffixlist": "RFC 9989's DNS tree walk needs no list (dmarc.mode: legacy uses "
                        "the bundled one)",
    "umask": "socket_mode (0660, with socket_group) sets the socket's permissions",
    "softwareheader": "mailwarden writes no software header",
    "externalignorelist": "it only kept OpenDKIM from logging unsigned mail from these hosts",
    "peerlist": "no setting of its own: `when: {not: {client_in: GROUP}}` on each rule skips "
                "a host group",
    "userid": "one daemon, running as `mailwarden`",
}
SPF_FOR_DMARC_ONLY = {"fail": "continue", "softfail": "continue", "neutral": "continue",
                      "none": "continue", "temperror": "continue", "permerror": "continue"}


@dataclass
class Imported:
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def import_opendkim(opendkim: str, opendmarc: str | None, hostname: str) -> Imported:
    """The mailwarden configuration for these files; ImportError_ when one is unusable."""
    dk = read_settings(opendkim)
    dm = read_settings(opendmarc) if opendmarc else None
    out = Imported({})
    notes = out.notes
    config = out.config
    authserv = (dm.get("AuthservID") if dm else None) or dk.get("AuthservID") or "HOSTNAME"
    config["authserv_id"] = hostname if authserv.upper() == "HOSTNAME" else authserv
    _socket(dk, dm, config, notes)
    config["user"] = config["group"] = "mailwarden"
    user = dk.get("UserID")
    if user:
        notes.append(f"{_at(dk, 'UserID')}: UserID {user}: mailwarden runs as `mailwarden`; "
                     "give it the key files: chown mailwarden: KEYFILE; chmod 0600 KEYFILE")
    internal = _hosts(dk, "InternalHosts", ["localhost"], notes)
    hosts: dict[str, list[str]] = {"internal": internal}
    keys, by_name = _keys(dk, notes)
    table = _signing_table(dk, by_name, notes)
    mode = (dk.get("Mode") or "sv").lower()
    rules: dict[str, list[dict[str, Any]]] = {}
    if dm is not None:
        rules["mail"] = [{"name": "spf", "check": "spf", "header": "auth",
                          "when": {"not": {"client_in": ["internal"]}},
                          "on": dict(SPF_FOR_DMARC_ONLY)}]
    eom: list[dict[str, Any]] = []
    if "v" in mode:
        eom.append({"name": "dkim", "check": "dkim_verify",
                    "when": {"not": {"client_in": ["internal"]}}})
    if dm is not None:
        eom.append(_dmarc_rule(dm, hosts, config, notes))
    if "s" in mode:
        if keys:
            eom.append({"name": "sign", "check": "dkim_sign", "allowed_hosts": ["internal"],
                        "authenticated": True})
        else:
            notes.append(f"{dk.path}: Mode {mode}: no keys configured, so no signing rule")
    if eom:
        rules["eom"] = eom
    config["domains"] = sorted({k["domain"] for k in keys})
    config["hosts"] = hosts
    signing = _signing_options(dk, keys, table, notes)  # read either way: reported once
    if keys:
        config["signing"] = signing
    if rules:
        config["rules"] = rules
    for settings in (dk, *([dm] if dm else [])):
        for name, value, line in settings.unused():
            why = NOT_NEEDED.get(name.lower(), "no equivalent in mailwarden")
            notes.append(f"{settings.path}:{line}: {name} {value}: not carried over: {why}")
    return out


def _at(settings: Settings, name: str) -> str:
    return f"{settings.path}:{settings.values[name.lower()][1]}"


def _socket(dk: Settings, dm: Settings | None, config: dict[str, Any],
            notes: list[str]) -> None:
    """One socket for both milters: OpenDKIM's port, or a unix socket of our own."""
    value = dk.get("Socket") or "inet:8891@localhost"
    kind, _, rest = value.partition(":")
    if kind.lower() in ("local", "unix"):
        inside_chroot = rest.startswith("/var/spool/postfix/")
        path = ("/var/spool/postfix/mailwarden/milter.sock" if inside_chroot
                else "/run/mailwarden/milter.sock")
        config["listen"] = f"unix:{path}"
        config["socket_group"] = "postfix"
        config["socket_mode"] = "0660"
        milter = f"unix:{path.removeprefix('/var/spool/postfix')}" if inside_chroot \
            else f"unix:{path}"
        notes.append(f"Socket {value}: mailwarden listens on unix:{path} (group postfix): "
                     f"in Postfix's main.cf, smtpd_milters = {milter}")
    else:
        config["listen"] = value
    if dm is not None:
        old = dm.get("Socket")
        if old:
            notes.append(f"{_at(dm, 'Socket')}: Socket {old}: one milter now does both: "
                         "remove OpenDMARC's socket from smtpd_milters/non_smtpd_milters")


def _hosts(settings: Settings, name: str, default: list[str], notes: list[str]) -> list[str]:
    """A host list: the file itself when every line is valid (so it stays the one to edit),
    else its valid entries, each invalid line reported."""
    value = settings.get(name)
    if value is None:
        return list(default)
    found = data_set(value, _at(settings, name))
    good, bad = [], []
    for entry, where in found.lines:
        problem = check_host_entry(entry)
        if problem:
            bad.append(f"{where}: {entry}: left out: {problem}")
        else:
            good.append(entry)
    notes.extend(bad)
    if found.kind in ("file", "refile") and not bad:
        return [f"file:{found.source}"]
    return good


def _keys(dk: Settings, notes: list[str]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """signing.keys, and KeyTable names to DOMAIN/SELECTOR."""
    keys: list[dict[str, str]] = []
    by_name: dict[str, str] = {}
    table = dk.get("KeyTable")
    if table is not None:
        for line, where in data_set(table, _at(dk, "KeyTable")).lines:
            name, spec = name_value(line)
            domain, _, rest = spec.strip().partition(":")
            selector, _, path = rest.partition(":")
            if not (domain and selector and path):
                notes.append(f"{where}: {line}: left out: expected NAME DOMAIN:SELECTOR:KEYFILE")
                continue
            if "%" in domain + selector or not path.startswith("/"):
                notes.append(f"{where}: {line}: left out: `%` domains and inline or relative "
                             "keys are not supported; write one entry per domain, key in a file")
                continue
            by_name[name] = f"{domain.lower()}/{selector}"
            keys.append({"domain": domain.lower(), "selector": selector, "key": path})
        return keys, by_name
    key_file, one_selector = dk.get("KeyFile"), dk.get("Selector")
    domains = dk.get("Domain")
    if key_file and one_selector and domains:
        for domain, _ in data_set(domains, _at(dk, "Domain")).lines:
            keys.append({"domain": domain.lower(), "selector": one_selector, "key": key_file})
    elif key_file or one_selector or domains:
        notes.append(f"{dk.path}: Domain, Selector and KeyFile go together: no key imported")
    return keys, by_name


def _signing_table(dk: Settings, by_name: dict[str, str],
                   notes: list[str]) -> list[dict[str, Any]]:
    """signing.table from SigningTable: `refile:` in file order; a plain file looked up as
    OpenDKIM does, addresses before domains."""
    value = dk.get("SigningTable")
    if value is None:
        if by_name:
            notes.append(f"{dk.path}: KeyTable without SigningTable: OpenDKIM signed nothing "
                         "with it; mailwarden signs each author domain with its own keys")
        return []
    found: DataSet = data_set(value, _at(dk, "SigningTable"))
    entries: dict[str, list[str]] = {}
    for line, where in found.lines:
        written, names = name_value(line)
        try:
            pattern = normalize(written)
        except ValueError as exc:
            notes.append(f"{where}: {line}: left out: {exc}")
            continue
        for name in names.split(","):
            key = by_name.get(name.strip())
            if key is None:
                notes.append(f"{where}: {line}: key {name.strip()!r} is not in the KeyTable")
            elif key not in entries.setdefault(pattern, []):
                entries[pattern].append(key)  # MultipleSignatures: every matching line
    ordered = list(entries.items())
    if found.kind != "refile":
        ordered.sort(key=lambda item: item[0].startswith("*"))
    if dk.flag("MultipleSignatures", False):
        # OpenDKIM signs with every entry that matches; here the first match decides, so an
        # entry gets the keys of every entry that matches all of its authors as well
        ordered = [(pattern, list(dict.fromkeys(
            key for other, keys in ordered if covers(other, pattern) for key in keys)))
            for pattern, _ in ordered]
    return [{"from": pattern, "keys": keys} for pattern, keys in ordered if keys]


def _signing_options(dk: Settings, keys: list[dict[str, str]], table: list[dict[str, Any]],
                     notes: list[str]) -> dict[str, Any]:
    signing: dict[str, Any] = {"keys": keys}
    if table:
        signing["table"] = table
    canon = (dk.get("Canonicalization") or "simple/simple").lower()
    header, _, body = canon.partition("/")
    signing["canonicalization"] = f"{header}/{body or 'simple'}"
    for setting, key in (("SignHeaders", "headers"), ("OversignHeaders", "oversign")):
        value = dk.get(setting)
        if value is not None:
            names = [n.lower() for n, _ in data_set(value, _at(dk, setting)).lines]
            signing[key] = names
    signing["allow_group_readable_keys"] = not dk.flag("RequireSafeKeys", True)
    bits = dk.get("MinimumKeyBits")
    if bits is not None and bits.strip().isdigit() and int(bits) > 1024:
        notes.append(f"{_at(dk, 'MinimumKeyBits')}: MinimumKeyBits {bits}: not carried over: "
                     "mailwarden refuses RSA keys under 1024 bits (RFC 8301), no higher bound")
    return signing


def _dmarc_rule(dm: Settings, hosts: dict[str, list[str]], config: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
    ignore = _hosts(dm, "IgnoreHosts", ["localhost"], notes)
    hosts["dmarc_ignore"] = ignore
    when: dict[str, Any] = {"not": {"client_in": ["dmarc_ignore"]}}
    if dm.flag("IgnoreAuthenticatedClients", False):
        when["authenticated"] = False
    rule: dict[str, Any] = {"name": "dmarc", "check": "dmarc", "when": when,
                            "enforce": dm.flag("RejectFailures", False)}
    history = dm.get("HistoryFile")
    config["dmarc"] = {"store": "/var/lib/mailwarden/dmarc.db"}
    if history:
        notes.append(f"{_at(dm, 'HistoryFile')}: HistoryFile {history}: evaluations go to the "
                     "store /var/lib/mailwarden/dmarc.db; set dmarc.reports and enable "
                     "mailwarden-dmarc-report.timer instead of opendmarc-import/-reports")
    if dm.get("TrustedAuthservIDs"):
        notes.append(f"{_at(dm, 'TrustedAuthservIDs')}: TrustedAuthservIDs: not carried over: "
                     "mailwarden evaluates SPF and DKIM itself, it reads no earlier "
                     "Authentication-Results")
    if not dm.flag("SPFSelfValidate", False):
        notes.append(f"{dm.path}: SPFSelfValidate is off: OpenDMARC read SPF from an earlier "
                     "Authentication-Results; mailwarden evaluates SPF itself (the `spf` "
                     "rule, enforcing nothing)")
    if dm.flag("FailureReports", False):
        notes.append(f"{_at(dm, 'FailureReports')}: FailureReports: not carried over: "
                     "failure reports need dmarc.store and dmarc.reports; then add "
                     "dmarc.failure_reports and enable mailwarden-dmarc-failures.timer")
    return rule


def render(imported: Imported, sources: list[str]) -> str:
    """The YAML text, with a header saying where it came from and what to do next."""
    today = dt.date.today().isoformat()
    head = (f"# Written by `mailwarden import opendkim` on {today} from {', '.join(sources)}.\n"
            "# Review it (docs/configuration.md), then: mailwarden check-config --config "
            "THIS_FILE\n")
    body = yaml.safe_dump(imported.config, sort_keys=False, default_flow_style=False,
                          width=100)
    return head + body


__all__ = ["ImportError_", "Imported", "import_opendkim", "render"]
