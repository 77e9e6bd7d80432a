"""The evaluation behind check_host() (RFC 7208 §4-§6): one record tree walked term by term,
with the processing limits of §4.6.4, the void-lookup limit and a wall-clock budget; every
DNS answer counted and checked for the DNSSEC AD bit. A `_Stop` ends it at once with
temperror or permerror; whatever happens, `Evaluation.run` returns an `Outcome`."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailwarden.deadline import Deadline
from mailwarden.dns import Answer, DNSClient, IPAddress, Status
from mailwarden.spf.macro import (
    MacroContext,
    MacroError,
    MacroString,
    expand,
    ip_macro_value,
    parse_macro_string,
    truncate_domain,
)
from mailwarden.spf.record import Directive, Record, RecordError, is_spf_record, parse_record


class Result(enum.StrEnum):
    """The results of §2.6."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class Limits:
    """Processing limits (§4.6.4, §11.1) and the evaluation's wall-clock budget in seconds;
    the `spf` check takes them from `limits.spf_*` and `spf.budget` (lowered only: these
    defaults are the RFC's maximums)."""

    dns_terms: int = 10
    void_lookups: int = 2
    mx_names: int = 10
    ptr_names: int = 10
    budget: float = 20.0


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Result
    mechanism: str | None = None
    cause: str = ""
    explanation: str | None = None


NO_RECORD = "no SPF record"

def valid_domain(domain: str) -> str | None:
    """§4.3: why `domain` is not a usable fully-qualified domain name, or None when it is."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        return "empty domain"
    if name.startswith("["):
        return "domain literal"
    if len(name) > 253:
        return "domain longer than 253 characters"
    labels = name.split(".")
    if len(labels) < 2:
        return "not a fully-qualified domain name"
    for label in labels:
        if not label:
            return "empty label"
        if len(label) > 63:
            return "label longer than 63 characters"
    return None


class _Stop(Exception):
    """Ends the evaluation at once with temperror or permerror (caught in `run`)."""

    def __init__(self, result: Result, cause: str) -> None:
        super().__init__(cause)
        self.outcome = Outcome(result, None, cause)


@dataclass
class Evaluation:
    dns: DNSClient
    ip: IPAddress
    sender: str
    helo: str
    receiver: str
    limits: Limits
    clock: Callable[[], float]
    outer: Deadline | None = None  # the caller's (a stage's budget)
    lookups: int = 0
    void: int = 0
    answers: int = 0
    authentic: bool = True
    deadline: Deadline = field(init=False)
    ctx: MacroContext = field(init=False)
    _validated: list[str] | None = None

    def __post_init__(self) -> None:
        self.deadline = Deadline.within(self.limits.budget, self.clock).earlier(self.outer)
        local, _, sender_domain = self.sender.rpartition("@")
        readable = str(self.ip)
        self.ctx = MacroContext(
            sender=self.sender,
            local_part=local or "postmaster",
            sender_domain=sender_domain,
            domain="",
            ip_macro=ip_macro_value(self.ip.packed),
            ip_readable=readable,
            ip_version="in-addr" if self.ip.version == 4 else "ip6",
            helo=self.helo,
            receiver=self.receiver,
            timestamp=int(time.time()),
            validated_name=self._validated_name,
        )

    def run(self, domain: str) -> Outcome:
        try:
            return self._check_host(domain, want_exp=True)
        except _Stop as stop:
            return stop.outcome

    # -- DNS ---------------------------------------------------------------------------
    def _query(self, kind: str, name: str) -> Answer[Any]:
        if self.deadline.expired:
            raise self._budget_exceeded()
        method: Callable[[str, Deadline | None], Answer[Any]] = getattr(self.dns, kind)
        answer = method(name, self.deadline)
        if answer.status is Status.TEMPERROR and self.deadline.expired:
            raise self._budget_exceeded()
        if answer.status is not Status.TEMPERROR:
            self.answers += 1
            self.authentic = self.authentic and answer.authentic
        return answer

    def _budget_exceeded(self) -> _Stop:
        if self.deadline is self.outer:
            return _Stop(Result.TEMPERROR, "evaluation ran out of the stage's time budget")
        return _Stop(Result.TEMPERROR,
                     f"evaluation exceeded its time budget of {self.limits.budget:g} s")

    def _addresses(self, name: str) -> Answer[Any]:
        return self._query("a" if self.ip.version == 4 else "aaaa", name)

    def _count_term(self, term: str) -> None:
        if self.lookups >= self.limits.dns_terms:
            raise _Stop(Result.PERMERROR,
                        f"more than {self.limits.dns_terms} DNS-querying terms "
                        f"(RFC 7208 §4.6.4), at {term!r}")
        self.lookups += 1

    def _count_void(self, answer: Answer[Any], term: str) -> None:
        if answer.void:
            self.void += 1
            if self.void > self.limits.void_lookups:
                raise _Stop(Result.PERMERROR,
                            f"more than {self.limits.void_lookups} void lookups "
                            f"(RFC 7208 §4.6.4), at {term!r} ({answer.name} {answer.status})")

    def _target(self, spec: MacroString | None, domain: str) -> str:
        if spec is None:
            return domain
        self.ctx.domain = domain
        return truncate_domain(expand(spec, self.ctx).rstrip(".")).lower()

    # -- check_host ----------------------------------------------------------------------
    def _check_host(self, domain: str, want_exp: bool) -> Outcome:
        domain = domain.rstrip(".").lower()
        problem = valid_domain(domain)
        if problem is not None:
            return Outcome(Result.NONE, cause=f"{problem}: {domain!r} (RFC 7208 §4.3)")
        record = self._fetch_record(domain)
        if isinstance(record, Outcome):
            return record
        for directive in record.directives:
            if self.deadline.expired:
                raise self._budget_exceeded()
            if self._matches(directive, domain):
                result = Result(directive.result)
                explanation = None
                if result is Result.FAIL and want_exp and record.exp is not None:
                    explanation = self._explanation(record.exp, domain)
                return Outcome(result, directive.text,
                                f"matched {directive.text!r} in the record of {domain}",
                                explanation)
        if record.redirect is not None:
            term = f"redirect={record.redirect.text}"
            self._count_term(term)
            target = self._target(record.redirect, domain)
            outcome = self._check_host(target, want_exp)
            if outcome.result is Result.NONE:
                # §6.1: a redirect to a domain without a record is a permerror.
                raise _Stop(Result.PERMERROR, f"{term}: {target} has {NO_RECORD}")
            return outcome
        return Outcome(Result.NEUTRAL, None,
                        f"no mechanism matched in the record of {domain} (default, RFC 7208 §4.7)")

    def _fetch_record(self, domain: str) -> Record | Outcome:
        """§4.4 and §4.5: the one SPF record of `domain`."""
        answer = self._query("txt", domain)
        if answer.status is Status.TEMPERROR:
            raise _Stop(Result.TEMPERROR, f"DNS error looking up TXT {domain}: {answer.error}")
        texts = [t for t in answer.records if is_spf_record(t)]
        if not texts:
            return Outcome(Result.NONE, cause=f"{domain} has {NO_RECORD}")
        if len(texts) > 1:
            raise _Stop(Result.PERMERROR,
                        f"{domain} publishes {len(texts)} SPF records (RFC 7208 §4.5)")
        record = parse_record(texts[0])
        if isinstance(record, RecordError):
            raise _Stop(Result.PERMERROR, f"syntax error in the record of {domain}: {record}")
        return record

    def _matches(self, directive: Directive, domain: str) -> bool:
        mechanism = directive.mechanism
        if mechanism == "all":
            return True
        if mechanism in ("ip4", "ip6"):
            return directive.network is not None and self.ip in directive.network
        term = directive.text
        self._count_term(term)
        target = self._target(directive.domain_spec, domain)
        if mechanism == "include":
            return self._include(term, target)
        if mechanism == "a":
            answer = self._addresses(target)
            self._raise_temperror(answer, term)
            self._count_void(answer, term)
            return self._in_addresses(answer.records, directive)
        if mechanism == "mx":
            return self._mx(directive, target)
        if mechanism == "ptr":
            return self._ptr(term, target)
        # exists: always an A query, whatever the client's address family (§5.7).
        answer = self._query("a", target)
        self._raise_temperror(answer, term)
        self._count_void(answer, term)
        return answer.ok

    def _raise_temperror(self, answer: Answer[Any], term: str) -> None:
        if answer.status is Status.TEMPERROR:
            raise _Stop(Result.TEMPERROR,
                        f"DNS error for {answer.rdtype} {answer.name} at {term!r}: "
                        f"{answer.error}")

    def _in_addresses(self, records: tuple[Any, ...], directive: Directive) -> bool:
        prefix = directive.cidr4 if self.ip.version == 4 else directive.cidr6
        bits = 32 if self.ip.version == 4 else 128
        shift = bits - prefix
        mine = int(self.ip) >> shift
        return any(int(address) >> shift == mine for address in records)

    def _include(self, term: str, target: str) -> bool:
        """§5.2: pass matches; fail, softfail, neutral do not; errors and none propagate."""
        outcome = self._check_host(target, want_exp=False)
        if outcome.result is Result.PASS:
            return True
        if outcome.result in (Result.FAIL, Result.SOFTFAIL, Result.NEUTRAL):
            return False
        if outcome.result is Result.NONE:
            raise _Stop(Result.PERMERROR, f"{term}: {target} has {NO_RECORD} (RFC 7208 §5.2)")
        raise _Stop(outcome.result, f"{term}: {outcome.cause}")

    def _mx(self, directive: Directive, target: str) -> bool:
        """§5.4, with the limit of §4.6.4 on address lookups per MX evaluation."""
        term = directive.text
        answer = self._query("mx", target)
        self._raise_temperror(answer, term)
        self._count_void(answer, term)
        hosts = [mx.exchange for mx in answer.records if mx.exchange]
        if len(hosts) > self.limits.mx_names:
            raise _Stop(Result.PERMERROR,
                        f"{term}: {target} has {len(hosts)} MX records, more than "
                        f"{self.limits.mx_names} (RFC 7208 §4.6.4)")
        for host in sorted(hosts):
            addresses = self._addresses(host)
            self._raise_temperror(addresses, term)
            if self._in_addresses(addresses.records, directive):
                return True
        return False

    def _validated_names(self) -> list[str]:
        """§5.5: the first 10 PTR names of the client whose addresses include it."""
        if self._validated is not None:
            return self._validated
        self._validated = []
        answer = self._query("ptr", self.ip.reverse_pointer)
        if answer.ok:
            for name in answer.records[: self.limits.ptr_names]:
                addresses = self._addresses(name)
                if any(address == self.ip for address in addresses.records):
                    self._validated.append(name)
        return self._validated

    def _ptr(self, term: str, target: str) -> bool:
        """§5.5: a DNS error in the PTR lookup means no match; name errors skip the name."""
        answer = self._query("ptr", self.ip.reverse_pointer)
        self._count_void(answer, term)
        if not answer.ok:
            return False
        suffix = "." + target
        candidates = [n for n in answer.records[: self.limits.ptr_names]
                      if n == target or n.endswith(suffix)]
        for name in candidates:
            addresses = self._addresses(name)
            if any(address == self.ip for address in addresses.records):
                return True
        return False

    def _validated_name(self) -> str:
        """The %{p} macro (§7.3): a validated name, preferring the current domain."""
        try:
            names = self._validated_names()
        except _Stop:
            names = []
        domain = self.ctx.domain
        for name in names:
            if name == domain:
                return name
        for name in names:
            if name.endswith("." + domain):
                return name
        return names[0] if names else "unknown"

    def _explanation(self, exp: MacroString, domain: str) -> str | None:
        """§6.2: any problem fetching or expanding the explanation means there is none."""
        try:
            target = self._target(exp, domain)
            if valid_domain(target) is not None:
                return None
            answer = self._query("txt", target)
        except _Stop:
            return None
        if not answer.ok or len(answer.records) != 1:
            return None
        parsed = parse_macro_string(answer.records[0], exp=True)
        if isinstance(parsed, MacroError):
            return None
        self.ctx.domain = domain
        text = expand(parsed, self.ctx)
        if not text.isascii():
            return None
        # Envelope values expanded into the text must not carry control characters into
        # an SMTP reply or a header.
        return "".join(ch if " " <= ch <= "~" else "?" for ch in text)
