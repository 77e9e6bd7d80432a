"""The result words a check gives its rule (and writes into Authentication-Results)."""

from __future__ import annotations

from enum import StrEnum


class Result(StrEnum):
    """The result words of checks: RFC 8601 §2.7 and the method registries (SPF, DKIM, DMARC,
    ARC, iprev), DMARC's disposition and an unusable From (RFC 9989 §4.4), and what a signing
    step did. Each check gives a subset (`CheckSpec.results`); rules key their `on:` by it."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    POLICY = "policy"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    UNUSABLE_FROM = "unusable_from"
    SIGNED = "signed"
    SEALED = "sealed"
    ERROR = "error"
