"""What the checks of one message found, as typed values.

A check returns its findings; the policy engine files them here, and the checks that depend
on another's findings (DMARC on SPF, DKIM and ARC) read them from here. No check writes another
check's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from mailwarden.results import Result

if TYPE_CHECKING:
    from mailwarden.dkim.verify import SignatureResult
    from mailwarden.dmarc.evaluate import DmarcResult


class SpfIdentity(StrEnum):
    """RFC 7208 §2.3/§2.4: the two identities SPF checks."""

    HELO = "helo"
    MAILFROM = "mailfrom"


@dataclass(frozen=True, slots=True)
class SpfFinding:
    identity: SpfIdentity
    domain: str
    result: Result  # RFC 7208 §2.6 result


@dataclass(frozen=True, slots=True)
class DkimFinding:
    """Every DKIM-Signature verified, top first (RFC 6376 §6.1)."""

    signatures: tuple[SignatureResult, ...]


@dataclass(frozen=True, slots=True)
class ArcFinding:
    """RFC 8617 chain validation: the result and the sealers, oldest first."""

    result: Result  # none | pass | fail | temperror
    sealers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DmarcFinding:
    """One DMARC evaluation, kept until the verdict is known: the disposition recorded and
    written into Authentication-Results is the one applied, not the one the policy asked."""

    rule: str
    evaluation: DmarcResult
    asked: Result  # the disposition this rule would apply: none | quarantine | reject
    spf_reported: tuple[tuple[str, str, str], ...] = ()  # (domain, scope, result) for reports
    overrides: tuple[tuple[str, str], ...] = ()  # RFC 9990 PolicyOverrideType, comment


class SignStatus(StrEnum):
    SIGNED = "signed"
    SEALED = "sealed"
    NONE = "none"  # nothing to do: not an allowed client, no key for the domain
    ERROR = "error"  # could not sign: over the header limits, a signing error


@dataclass(frozen=True, slots=True)
class SigningFinding:
    """What one signing or sealing rule did to the message, or why it did nothing."""

    rule: str
    check: str  # dkim_sign | arc_seal
    status: SignStatus
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""

    def outcome(self) -> str:
        """`signed(d=example.com s=s1 a=rsa-sha256)` or `none(reason)`."""
        if self.status in (SignStatus.SIGNED, SignStatus.SEALED):
            detail = f"d={self.domain} s={self.selector} a={self.algorithm}"
        else:
            detail = self.reason
        return str(self.status) + (f"({detail})" if detail else "")

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "check": self.check, "result": str(self.status),
                "domain": self.domain, "selector": self.selector,
                "algorithm": self.algorithm, "reason": self.reason}


Finding = SpfFinding | DkimFinding | ArcFinding | DmarcFinding | SigningFinding


@dataclass(slots=True)
class Findings:
    """The findings of one message (connection-level ones are copied in at MAIL FROM)."""

    spf: dict[SpfIdentity, SpfFinding] = field(default_factory=dict)
    dkim: DkimFinding | None = None  # None: not verified (yet)
    arc: ArcFinding | None = None
    dmarc: list[DmarcFinding] = field(default_factory=list)
    signing: list[SigningFinding] = field(default_factory=list)
    # the failure reports (RFC 9991) made for this message: "KIND report (fo=...) to URIS"
    failure_reports: list[str] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        if isinstance(finding, SpfFinding):
            self.spf[finding.identity] = finding
        elif isinstance(finding, DkimFinding):
            self.dkim = finding
        elif isinstance(finding, ArcFinding):
            self.arc = finding
        elif isinstance(finding, DmarcFinding):
            self.dmarc.append(finding)
        else:
            self.signing.append(finding)
