"""A pflogsumm-style digest of decision lines (`logparse`): how many of each verdict, which
rules refused, which clients and From domains were refused most, what monitor mode held back,
what signing did, and why lookups failed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mailwarden.logparse import client_address
from mailwarden.verdict import Action

REFUSED = frozenset(str(action) for action in Action if action.refuses)


@dataclass
class Summary:
    decisions: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    refusing_rules: Counter[str] = field(default_factory=Counter)
    refused_clients: Counter[str] = field(default_factory=Counter)
    refused_from_domains: Counter[str] = field(default_factory=Counter)
    tempfail_causes: Counter[str] = field(default_factory=Counter)
    monitored: Counter[str] = field(default_factory=Counter)
    signing: Counter[str] = field(default_factory=Counter)

    def add(self, line: dict[str, str]) -> None:
        # the MTA gave up on the message (RSET, a lost client): no verdict was given
        verdict = "aborted" if line["stage"] in ("abort", "close") else line["verdict"]
        self.decisions += 1
        self.verdicts[verdict] += 1
        if verdict in REFUSED:
            rule = line.get("rule", "-")
            check = line.get("check")
            self.refusing_rules[f"{verdict} {rule} ({check})" if check else
                                f"{verdict} {rule}"] += 1
            self.refused_clients[client_address(line.get("client", "-"))] += 1
            if line.get("from_domain", "-") != "-":
                self.refused_from_domains[line["from_domain"]] += 1
        if verdict == "tempfail":
            self.tempfail_causes[line.get("cause") or line.get("reply", "-")] += 1
        if "monitor" in line:
            for held in line["monitor"].split("; "):
                self.monitored[held.partition(":")[0]] += 1
        for check in ("dkim_sign", "arc_seal"):
            if check in line:
                self.signing[f"{check} {line[check].partition('(')[0]}"] += 1

    def as_dict(self, top: int) -> dict[str, Any]:
        return {"decisions": self.decisions, "verdicts": dict(self.verdicts),
                "refusing_rules": dict(self.refusing_rules.most_common(top)),
                "refused_clients": dict(self.refused_clients.most_common(top)),
                "refused_from_domains": dict(self.refused_from_domains.most_common(top)),
                "tempfail_causes": dict(self.tempfail_causes.most_common(top)),
                "monitored": dict(self.monitored.most_common(top)),
                "signing": dict(self.signing)}


def summarize(lines: Iterable[dict[str, str]]) -> Summary:
    summary = Summary()
    for line in lines:
        summary.add(line)
    return summary


def format_summary(summary: Summary, top: int) -> str:
    out = [f"{summary.decisions} decisions"]
    for verdict in ("continue", "accept", "quarantine", "reject", "tempfail", "discard",
                    "aborted"):
        if summary.verdicts[verdict]:
            out.append(f"  {verdict:<60}{summary.verdicts[verdict]:>8}")
    sections = (("refusals by verdict, rule (check)", summary.refusing_rules),
                ("most refused clients", summary.refused_clients),
                ("most refused From domains", summary.refused_from_domains),
                ("temporary failures by cause", summary.tempfail_causes),
                ("monitor mode held back", summary.monitored),
                ("signing", summary.signing))
    for title, counts in sections:
        if counts:
            out += ["", title]
            out += [f"  {name[:60]:<60}{count:>8}" for name, count in counts.most_common(top)]
    return "\n".join(out)
