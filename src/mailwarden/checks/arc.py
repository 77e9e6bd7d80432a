"""ARC (RFC 8617), both optional: `arc_verify` validates the chain (none/pass/fail, with
`arc.chain` naming the sealers, oldest first, for DMARC's trusted-sealer override) and
`arc_seal` adds ARC-Authentication-Results, ARC-Message-Signature and ARC-Seal with the next
instance number, after our Authentication-Results is written."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dkim as dkimpy

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.deadline import Deadline
from mailwarden.dns import DNSClient, Status
from mailwarden.findings import ArcFinding, SigningFinding, SignStatus
from mailwarden.headers import AR, forged_indices
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section


class _Temporary(dkimpy.DKIMException):  # type: ignore[misc]
    pass


def dnsfunc(dns: DNSClient, failures: list[str],
            deadline: Deadline | None = None) -> Callable[..., bytes | None]:
    """dkimpy's DNS hook over our resolver. A temporary error raises and is also noted in
    `failures`, because dkimpy's ARC code swallows exceptions from key lookups."""

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        answer = dns.txt(name.decode("ascii", "replace").rstrip("."), deadline)
        if answer.status is Status.TEMPERROR:
            failures.append(f"DNS error for {name.decode('ascii', 'replace')}: {answer.error}")
            raise _Temporary(failures[-1])
        return answer.records[0].encode("latin-1") if answer.ok else None

    return txt


@dataclass(frozen=True, slots=True)
class NoArgs:
    pass


def parse_none(section: Section, config: Config) -> NoArgs:
    return NoArgs()


def no_outcomes(args: object) -> Mapping[Result, Outcome]:
    return {}


_ARC_FIELDS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
_INSTANCE = re.compile(r"(?:^|[\s;])i\s*=\s*(\d{1,9})")


def chain_length(txn: Transaction) -> int:
    """How many ARC sets a validation would go through: the ARC-Seal fields, or the highest
    i= of any ARC field (dkimpy validates every instance from the highest down, each with two
    key lookups)."""
    seals, highest = 0, 0
    for name, value in txn.headers:
        lower = name.lower()
        if lower not in _ARC_FIELDS:
            continue
        if lower == "arc-seal":
            seals += 1
        found = _INSTANCE.search(value)
        if found is not None:
            highest = max(highest, int(found.group(1)))
    return max(seals, highest)


def run_verify(ctx: Context, txn: Transaction, args: NoArgs) -> CheckOutcome:
    sets, limit = chain_length(txn), ctx.config.limits.arc_sets
    if sets > limit:
        # Not validated at all: no key is looked up (RFC 8617 §4.2.1 allows 50 sets at most).
        reason = f"chain of {sets} ARC sets, more than {limit} (limits.arc_sets)"
        return CheckOutcome(Result.FAIL, (CheckResult("", "arc", Result.FAIL, reason),),
                            text=f"ARC fail: {reason}", findings=(ArcFinding(Result.FAIL),))
    message = txn.message()
    failures: list[str] = []
    try:
        lookup = dnsfunc(ctx.dns, failures, txn.deadline)
        cv, results, comment = dkimpy.arc_verify(message, dnsfunc=lookup)
    except dkimpy.DKIMException as exc:
        cv, results, comment = b"fail", [], str(exc)
    if failures:  # a key could not be fetched just now: no verdict (RFC 8601 §2.7.1)
        return CheckOutcome(Result.TEMPERROR,
                            (CheckResult("", "arc", Result.TEMPERROR, failures[0]),),
                            text="ARC validation failed temporarily",
                            findings=(ArcFinding(Result.TEMPERROR),))
    # dkimpy reports a chain whose latest seal says cv=fail as None: that chain fails
    # (RFC 8617 §5.2 step 2).
    result = _CHAIN_VALIDATION.get((cv or b"fail").lower(), Result.FAIL)
    sealers = [r.get("as-domain", b"").decode("ascii", "replace") for r in
               sorted(results, key=lambda r: int(r.get("instance", 0)))]
    props = (("arc.chain", ":".join(s for s in sealers if s)),) if sealers else ()
    reason = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    finding = ArcFinding(result, tuple(s for s in sealers if s))
    return CheckOutcome(result, (CheckResult("", "arc", result, reason, props),),
                        text=f"ARC {result}", findings=(finding,))


@dataclass(frozen=True, slots=True)
class SealArgs:
    domain: str


def parse_seal(section: Section, config: Config) -> SealArgs:
    domain = section.string("domain", required=True).lower()
    if not any(k.domain == domain and k.algorithm == "rsa-sha256"
               for k in config.signing.active):
        raise section.error("domain", f"no active rsa-sha256 key for {domain} in signing.keys "
                                      "(ARC seals with RSA, RFC 8617 §4.1.3)")
    return SealArgs(domain)


def _not_sealed(domain: str, reason: str) -> CheckOutcome:
    finding = SigningFinding("", "arc_seal", SignStatus.ERROR, domain=domain, reason=reason)
    return CheckOutcome(Result.ERROR, text=reason, findings=(finding,))


def run_seal(ctx: Context, txn: Transaction, args: SealArgs) -> CheckOutcome:
    if txn.header_cut:  # a seal over the fields we kept would not validate downstream
        return _not_sealed(args.domain, f"cannot seal: {txn.header_cut}")
    key = next(k for k in ctx.config.signing.active
               if k.domain == args.domain and k.algorithm == "rsa-sha256")
    try:
        lines = dkimpy.arc_sign(_sealed_message(txn, ctx.config.authserv_id),
                                key.selector.encode(), key.domain.encode(),
                                key.private, ctx.config.authserv_id.encode())
    except dkimpy.DKIMException as exc:
        return _not_sealed(args.domain, f"cannot seal: {exc}")
    fields = []
    for line in lines:
        name, _, value = line.decode("ascii").partition(":")
        fields.append((name, value.rstrip("\r\n").replace("\r\n", "\n")))
    finding = SigningFinding("", "arc_seal", SignStatus.SEALED, key.domain, key.selector,
                             key.algorithm)
    return CheckOutcome(Result.SEALED, headers=tuple(fields), text="sealed", findings=(finding,))


def _sealed_message(txn: Transaction, authserv_id: str) -> bytes:
    """The message as the MTA delivers it: our Authentication-Results on top, and without the
    fields that claim our authserv-id (forged: the MTA deletes them, RFC 8601 §5). dkimpy
    copies every Authentication-Results field with our authserv-id into the seal."""
    fields = [i for i, (name, _) in enumerate(txn.headers) if name.lower() == AR.lower()]
    forged = {fields[position - 1] for position in forged_indices(txn.headers, authserv_id)}
    ours = f"{AR}: {txn.authentication_results}\r\n".encode()
    return ours + txn.header_block(omit=forged) + b"".join(txn.body_chunks())


# RFC 8617 §4.4 cv= values; anything else is a failed chain
_CHAIN_VALIDATION = {b"pass": Result.PASS, b"fail": Result.FAIL, b"none": Result.NONE}

VERIFY = CheckSpec(name="arc_verify", stages=(Stage.EOM,),
                   results=(Result.NONE, Result.PASS, Result.FAIL, Result.TEMPERROR),
                   parse_args=parse_none,
                   run=run_verify, outcomes=no_outcomes, needs_body=True,
                   worded={Result.NONE: "ARC none", Result.PASS: "ARC pass",
                           Result.FAIL: "ARC fail (ARC fail: REASON for a chain longer than "
                           "limits.arc_sets)"})
SEAL = CheckSpec(name="arc_seal", stages=(Stage.EOM,), results=(Result.SEALED, Result.ERROR),
                 parse_args=parse_seal, run=run_seal, outcomes=no_outcomes, needs_body=True,
                 transform=True, after_headers=True)
