"""`dkim_verify` (check) and `dkim_sign` (action), both at end of message.

dkim_verify: every DKIM-Signature gets its own Authentication-Results entry (RFC 8601
`dkim=RESULT header.d header.s header.a header.b`); the rule acts on the best one: pass if any
passes, else temperror if a key lookup failed temporarily, else the first other result, or
none when unsigned. Refusals: 550 5.7.20 (no passing signature), 5.7.21 (none acceptable),
451 4.7.20 for temperror (RFC 7372).

dkim_sign: signs with every key of the From domain (or its closest parent with keys, when
`signing.parent_domains`), so RSA and Ed25519 keys give two signatures (RFC 8463).
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dkim as dkimpy

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.dkim.sign import SignOptions, sign_message
from mailwarden.dkim.verify import SignatureResult, verify_message
from mailwarden.findings import DkimFinding, SigningFinding, SignStatus
from mailwarden.relay import Membership
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Reply, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

VERIFY_RESULTS = (Result.PASS, Result.FAIL, Result.POLICY, Result.NEUTRAL, Result.NONE,
                  Result.TEMPERROR, Result.PERMERROR)
# the rule acts on the best signature: pass, else a lookup to retry, else the first failure
_ORDER = (Result.PASS, Result.TEMPERROR, Result.FAIL, Result.POLICY, Result.PERMERROR,
          Result.NEUTRAL)


@dataclass(frozen=True, slots=True)
class VerifyArgs:
    max_signatures: int = 8
    accept_body_length: bool = True


def parse_verify(section: Section, config: Config) -> VerifyArgs:
    # The rule's own max_signatures wins; without one, the configured limit applies.
    return VerifyArgs(section.integer("max_signatures", config.limits.dkim_signatures,
                                      minimum=1, maximum=64),
                      section.boolean("accept_body_length", True))


def _record(sig: SignatureResult) -> CheckResult:
    props = [("header.d", sig.domain), ("header.s", sig.selector)]
    if sig.algorithm:
        props.append(("header.a", sig.algorithm))
    if sig.b:
        props.append(("header.b", sig.b))
    passed = sig.result is Result.PASS and sig.key_bits
    comment = f"{sig.key_bits}-bit key" if passed else sig.reason
    if sig.body_length is not None:
        comment += f"; l={sig.body_length}"
    return CheckResult("", "dkim", sig.result, sig.reason,
                       tuple((k, v) for k, v in props if v), comment=comment)


def verify(ctx: Context, txn: Transaction, max_signatures: int,
           accept_body_length: bool = True) -> DkimFinding:
    """Every DKIM-Signature of the message, verified (RFC 6376 §6)."""
    return DkimFinding(tuple(verify_message(
        txn.header_block(), ctx.dns, body=txn.body_chunks, crlf=True,
        max_signatures=max_signatures, accept_body_length=accept_body_length,
        deadline=txn.deadline)))


def run_verify(ctx: Context, txn: Transaction, args: VerifyArgs) -> CheckOutcome:
    finding = verify(ctx, txn, args.max_signatures, args.accept_body_length)
    signatures = finding.signatures
    if not signatures:
        return CheckOutcome(Result.NONE, (CheckResult("", "dkim", Result.NONE, "no signature"),),
                            text=wording(Result.NONE, "", ""), findings=(finding,))
    records = tuple(_record(sig) for sig in signatures)
    found = {sig.result for sig in signatures}
    decisive = next(word for word in _ORDER if word in found)
    first = next(sig for sig in signatures if sig.result == decisive)
    text = wording(decisive, first.domain or "unknown domain", first.reason)
    return CheckOutcome(decisive, records, text=text, findings=(finding,))


def wording(result: Result, domain: str, reason: str) -> str:
    if result is Result.NONE:
        return "No DKIM signature"
    return f"DKIM {result}: {domain}: {reason}"


def verify_outcomes(args: VerifyArgs) -> Mapping[Result, Outcome]:
    return {}


@dataclass(frozen=True, slots=True)
class SignArgs:
    allowed_hosts: tuple[str, ...] = ()
    authenticated: bool = True


def parse_sign(section: Section, config: Config) -> SignArgs:
    if not config.signing.keys:
        raise section.error("check", "dkim_sign needs keys in signing.keys")
    groups = section.str_list("allowed_hosts")
    for group in groups:
        if group not in config.hosts:
            raise section.error("allowed_hosts", f"no host group named {group!r} in hosts:")
    return SignArgs(groups, section.boolean("authenticated", True))


def author_address(txn: Transaction) -> str:
    """The (first) From address (RFC 5322 §3.6.2), its domain lower-cased; empty if none."""
    values = txn.header_values("From")
    if not values:
        return ""
    addresses = email.utils.getaddresses(values)
    for _, address in addresses:
        if "@" in address:
            local, _, domain = address.rpartition("@")
            return f"{local}@{domain.lower().rstrip('.>')}"
    return ""


def _unsigned(status: SignStatus, reason: str, domain: str = "") -> CheckOutcome:
    finding = SigningFinding("", "dkim_sign", status, domain=domain, reason=reason)
    return CheckOutcome(Result(status), text=reason, findings=(finding,))


def run_sign(ctx: Context, txn: Transaction, args: SignArgs) -> CheckOutcome:
    """One DKIM-Signature per key of the From domain (RFC 6376 §5), or why none."""
    allowed = (not args.allowed_hosts and not args.authenticated) or \
        ctx.client_in(txn, args.allowed_hosts, args.authenticated) is Membership.IN
    if not allowed:
        return _unsigned(SignStatus.NONE, "not an internal or authenticated client")
    address = author_address(txn)
    domain = address.rpartition("@")[2]
    keys = ctx.config.signing.keys_for_author(address) if address else ()
    if not keys:
        why = (f"no signing.table entry for {domain or 'the From address'}"
               if ctx.config.signing.table else
               f"no signing key for {domain or 'the From domain'}")
        return _unsigned(SignStatus.NONE, why, domain)
    if txn.header_cut:  # a signature over the fields we kept would not verify downstream
        return _unsigned(SignStatus.ERROR, f"cannot sign: {txn.header_cut}", domain)
    signing = ctx.config.signing
    options = SignOptions(signing.headers, signing.oversign, signing.canonicalization)
    try:
        fields = sign_message(txn.header_block(), keys, options, body=txn.body_chunks,
                              crlf=True)
    except dkimpy.DKIMException as exc:
        return _unsigned(SignStatus.ERROR, f"cannot sign: {exc}", domain)
    findings = tuple(SigningFinding("", "dkim_sign", SignStatus.SIGNED, key.domain,
                                    key.selector, key.algorithm) for key in keys)
    return CheckOutcome(Result.SIGNED, headers=tuple(fields), findings=findings,
                        text=f"signed for {keys[0].domain} with {len(keys)} key(s)")


def sign_outcomes(args: SignArgs) -> Mapping[Result, Outcome]:
    return {}


VERIFY = CheckSpec(
    name="dkim_verify", stages=(Stage.EOM,), results=VERIFY_RESULTS,
    parse_args=parse_verify, run=run_verify, outcomes=verify_outcomes,
    replies={Result.FAIL: Reply(550, "5.7.20", "No passing DKIM signature found"),
             Result.NONE: Reply(550, "5.7.20", "No passing DKIM signature found"),
             Result.NEUTRAL: Reply(550, "5.7.20", "No passing DKIM signature found"),
             Result.PERMERROR: Reply(550, "5.7.20", "No passing DKIM signature found"),
             Result.POLICY: Reply(550, "5.7.21", "No acceptable DKIM signature found"),
             Result.TEMPERROR: Reply(451, "4.7.20", "DKIM key lookup failed, try again later")},
    worded={result: wording(result, "DOMAIN", "REASON") for result in VERIFY_RESULTS},
    needs_body=True,
)
SIGN = CheckSpec(
    name="dkim_sign", stages=(Stage.EOM,), results=(Result.SIGNED, Result.NONE, Result.ERROR),
    parse_args=parse_sign, run=run_sign, outcomes=sign_outcomes, needs_body=True,
    transform=True,
)
