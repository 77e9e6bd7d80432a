"""The effective policy of a configuration, as `mailwarden check-config` prints it: every rule
with its arguments and what each of its check's results leads to, defaults filled in."""

from __future__ import annotations

import dataclasses
from typing import Any

from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config, Outcome
from mailwarden.dmarc.store import redact
from mailwarden.logsetup import socket_of
from mailwarden.policy import codes
from mailwarden.results import Result
from mailwarden.verdict import Action


def effective_policy(config: Config) -> dict[str, Any]:
    rules: dict[str, list[dict[str, Any]]] = {}
    for stage in STAGES:
        for rule in config.stage_rules(stage):
            spec = CHECKS[rule.check]
            defaults = spec.outcomes(rule.args)
            results: dict[str, str] = {}
            for result in spec.results:
                outcome = rule.on.get(result) or defaults.get(result) or Outcome(Action.CONTINUE)
                action = outcome.action
                if result is Result.TEMPERROR and action is Action.REJECT:
                    action = Action.TEMPFAIL
                    outcome = dataclasses.replace(outcome, action=action)
                text = str(action)
                if action in (Action.REJECT, Action.TEMPFAIL):
                    # the reply as sent: the check's own words where it has them, their
                    # variable parts in capitals
                    reply = codes.reply_for(spec.replies.get(result), outcome, str(action))
                    worded = codes.reply_text(outcome, result, spec.worded.get(result, ""),
                                              reply)
                    text += f" {reply.code} {reply.status} {worded}"
                elif action is Action.QUARANTINE:  # the reason the MTA is given
                    held = outcome.text or spec.worded.get(result) or f"{rule.check}={result}"
                    text += f" ({held})"
                results[str(result)] = text
            entry: dict[str, Any] = {"name": rule.name, "check": rule.check,
                                     "line": rule.line, "mode": str(rule.mode)}
            args = rule.args
            is_record = dataclasses.is_dataclass(args) and not isinstance(args, type)
            entry["args"] = dataclasses.asdict(args) if is_record else {}
            if rule.when is not None:
                entry["when"] = _condition(dataclasses.asdict(rule.when))
            entry["results"] = results
            rules.setdefault(stage, []).append(entry)
    return {
        "file": config.path,
        "listen": config.listen,
        "user": config.user,
        "group": config.group,
        "authserv_id": config.authserv_id,
        "log_level": config.log_level,
        "log": {"target": str(config.log.target), "facility": config.log.facility,
                "socket": socket_of(config.log) if config.log.target != "stderr" else None},
        "workers": config.workers,
        "drain_timeout": config.drain_timeout,
        "mode": config.mode,
        "limits": dataclasses.asdict(config.limits),
        "metrics": config.metrics_listen or None,
        "dns": {
            "nameservers": [str(ns) for ns in config.dns.nameservers] or "from /etc/resolv.conf",
            "timeout": config.dns.timeout,
            "lifetime": config.dns.lifetime,
            "cache_size": config.dns.cache_size,
        },
        "spf_budget": config.spf_budget,
        "stage_budget": config.stage_budget,
        "transport": str(config.transport),
        "socket": {"mode": f"{config.socket_mode:04o}", "group": config.socket_group},
        "signing": [{"domain": key.domain, "selector": key.selector,
                     "algorithm": key.algorithm, "key": key.path,
                     "state": "staged" if key.staged else "active"}
                    for key in config.signing.keys],
        "signing_table": [{"from": entry.pattern,
                           "keys": [f"{k.domain}/{k.selector}" for k in entry.keys]}
                          for entry in config.signing.table],
        "dmarc": {"mode": config.dmarc.mode, "store": redact(config.dmarc.store) or None,
                  "reports": dict(config.dmarc.reports) or None,
                  "failure_reports": _failure_reports(config)},
        "domains": sorted(config.domains),
        "hosts": {name: list(entries) for name, entries in config.hosts.items()},
        "rules": rules,
    }


def _failure_reports(config: Config) -> dict[str, Any] | None:
    found = config.dmarc.failure_reports
    if found is None:
        return None
    return {"rate_limit": found.rate_limit, "redact": found.redact,
            "domains": list(found.domains)}


def _condition(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()
           if v not in ((), None) and k != "negate"}
    if data.get("negate"):
        out["not"] = _condition(data["negate"])
    return out


def shown(value: Any) -> str:
    """A value as the configuration would write it (no Python reprs)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def _log_line(policy: dict[str, Any]) -> str:
    log = policy["log"]
    where = (f"{log['target']} {log['socket']}, facility {log['facility']}" if log["socket"]
             else "stderr (the journal, under systemd)")
    return f"log {policy['log_level']} to {where}"


def format_policy(policy: dict[str, Any]) -> str:
    socket = policy["socket"]
    lines = [f"configuration {policy['file']}: parsed",
             f"listen {policy['listen']}  socket mode {socket['mode']}, group "
             f"{socket['group'] or '(the daemon group)'}  transport {policy['transport']}",
             f"user {policy['user'] or '-'}:{policy['group'] or '-'}"
             f"  workers {policy['workers']}  authserv-id {policy['authserv_id']}",
             _log_line(policy),
             f"mode {policy['mode']}  metrics "
             f"{'http://' + policy['metrics'] + '/metrics' if policy['metrics'] else 'off'}",
             f"dns {shown(policy['dns'])}",
             f"budgets: stage {policy['stage_budget']:g} s, spf {policy['spf_budget']:g} s",
             "limits " + " ".join(f"{k}={v}" for k, v in policy["limits"].items()),
             f"domains {', '.join(policy['domains']) or '-'}"]
    for key in policy["signing"]:
        staged = "  (staged: never signs)" if key["state"] == "staged" else ""
        lines.append(f"signing key {key['domain']}/{key['selector']} {key['algorithm']} "
                     f"{key['key']}{staged}")
    for entry in policy["signing_table"]:
        lines.append(f"signing table {entry['from']} -> {', '.join(entry['keys'])}")
    dmarc = policy["dmarc"]
    lines.append(f"dmarc mode {dmarc['mode']}  store {dmarc['store'] or '-'}  reports "
                 f"{shown(dmarc['reports']) if dmarc['reports'] else 'off'}")
    failures = dmarc["failure_reports"]
    lines.append("dmarc failure reports " + (
        "off" if failures is None else
        f"on: at most {failures['rate_limit']} per destination and hour, "
        f"{'redacted' if failures['redact'] else 'NOT redacted'}, domains "
        f"{', '.join(failures['domains']) or 'any with ruf='}"))
    for name, entries in policy["hosts"].items():
        lines.append(f"hosts.{name}: {', '.join(entries)}")
    for stage, rules in policy["rules"].items():
        lines.append(f"{stage}:")
        for rule in rules:
            args = " ".join(f"{k}={shown(v)}" for k, v in rule["args"].items())
            monitor = "  [monitor: never refuses]" if rule["mode"] == "monitor" else ""
            lines.append(f"  - {rule['name']} (line {rule['line']}): {rule['check']} {args}"
                         f"{monitor}")
            if "when" in rule:
                lines.append(f"      when {shown(rule['when'])}")
            for result, action in rule["results"].items():
                lines.append(f"      {result:<10} -> {action}")
    return "\n".join(lines)
