"""The `iprev` check (RFC 8601 §3): forward-confirmed reverse DNS of the client.

pass: a name from the PTR lookup has an address equal to the client's; fail: the PTR names'
forward lookups gave no matching address; permerror: no PTR record; temperror: a DNS
temporary error. Only the first `max_names` names are looked up (default `limits.iprev_names`),
so a PTR answer of 50 names costs at most that many address lookups. Recorded as
`iprev=RESULT policy.iprev=IP (name)`; by default only recorded, with 550 5.7.25 (RFC 7372)
when a rule refuses on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.deadline import Deadline
from mailwarden.dns import DNSClient, IPAddress, Status
from mailwarden.policy import codes
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

RESULTS = (Result.PASS, Result.FAIL, Result.TEMPERROR, Result.PERMERROR)


@dataclass(frozen=True, slots=True)
class IprevArgs:
    max_names: int = 10


def parse_args(section: Section, config: Config) -> IprevArgs:
    # The rule's own max_names wins; without one, the configured limit applies.
    return IprevArgs(section.integer("max_names", config.limits.iprev_names, minimum=1,
                                     maximum=50))


def outcomes(args: IprevArgs) -> Mapping[Result, Outcome]:
    return {}


@dataclass(frozen=True, slots=True)
class IprevResult:
    result: Result
    name: str  # the confirmed name, or the first PTR name
    reason: str


def iprev(dns: DNSClient, ip: IPAddress, max_names: int = 10,
          deadline: Deadline | None = None) -> IprevResult:
    """RFC 8601 §2.7.3: the iprev evaluation of `ip`."""
    answer = dns.ptr(ip.reverse_pointer, deadline)
    if answer.status is Status.TEMPERROR:
        return IprevResult(Result.TEMPERROR, "", f"PTR lookup failed: {answer.error}")
    if not answer.ok:
        return IprevResult(Result.PERMERROR, "", f"no PTR record for {ip} ({answer.status})")
    names: tuple[str, ...] = answer.records[:max_names]
    temporary = ""
    for name in names:
        forward = dns.a(name, deadline) if ip.version == 4 else dns.aaaa(name, deadline)
        if forward.status is Status.TEMPERROR:
            temporary = f"forward lookup of {name} failed: {forward.error}"
        elif ip in forward.records:
            return IprevResult(Result.PASS, name, f"{ip} is {name}")
    if temporary:
        return IprevResult(Result.TEMPERROR, names[0], temporary)
    return IprevResult(Result.FAIL, names[0], f"no PTR name of {ip} resolves back to it")


def run(ctx: Context, txn: Transaction, args: IprevArgs) -> CheckOutcome:
    if txn.client_ip is None:
        return CheckOutcome(Result.PERMERROR, text=wording("unknown", "no client address"))
    found = iprev(ctx.dns, txn.client_ip, args.max_names, txn.deadline)
    record = CheckResult("", "iprev", found.result, found.reason,
                         (("policy.iprev", str(txn.client_ip)),), comment=found.name or None)
    return CheckOutcome(found.result, (record,), text=wording(str(txn.client_ip), found.reason))


def wording(ip: str, reason: str) -> str:
    return f"Reverse DNS of {ip}: {reason}"


SPEC = CheckSpec(
    name="iprev", stages=(Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.EOM),
    results=RESULTS,
    parse_args=parse_args, run=run, outcomes=outcomes,
    replies={Result.FAIL: codes.IPREV_FAIL, Result.PERMERROR: codes.IPREV_FAIL,
             Result.TEMPERROR: codes.IPREV_TEMPERROR},
    worded={result: wording("IP", "REASON") for result in RESULTS},
)
