"""What a check is (`CheckSpec`), what it may use (`Context`) and what one run of it returns
(`CheckOutcome`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailwarden.config.model import Outcome
from mailwarden.dns import DNSClient
from mailwarden.findings import Finding
from mailwarden.relay import HostGroup, Membership
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Reply, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section


@dataclass
class Context:
    """What checks may use besides the transaction."""

    config: Config
    dns: DNSClient
    groups: Mapping[str, HostGroup]
    clock: Callable[[], float] = time.monotonic
    _store: Any = None
    _store_lock: threading.Lock = field(default_factory=threading.Lock)

    def client_in(self, txn: Transaction, groups: Sequence[str],
                  authenticated: bool = False) -> Membership:
        """Is the client allowed: authenticated (when that counts), or in one of the host
        groups? UNKNOWN when a group's host names could not be resolved just now."""
        if authenticated and txn.authenticated:
            return Membership.IN
        if txn.client_ip is None:
            return Membership.OUT
        unknown = False
        for name in groups:
            member = self.groups[name].membership(txn.client_ip, self.dns, txn.deadline)
            if member is Membership.IN:
                return member
            unknown = unknown or member is Membership.UNKNOWN
        return Membership.UNKNOWN if unknown else Membership.OUT

    def store(self) -> Any:
        """The recording path into the DMARC report store (a `mailwarden.dmarc.recorder.Recorder`:
        its `record()` never raises), made on first use; it opens the store in this process
        (never across fork), and a store that cannot be opened or written costs report rows,
        never a verdict."""
        with self._store_lock:
            if self._store is None:
                from mailwarden.dmarc.recorder import shared

                self._store = shared(self.config.dmarc.store)
            return self._store


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What one run of a check found: the result the rule acts on, every result to record,
    headers to add, the text for an SMTP reply should the rule refuse, and the typed findings
    the engine files for the checks that depend on this one."""

    decisive: Result
    results: tuple[CheckResult, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    text: str = ""
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    stages: tuple[Stage, ...]
    results: tuple[Result, ...]
    parse_args: Callable[[Section, Config], Any]
    run: Callable[[Context, Transaction, Any], CheckOutcome]
    outcomes: Callable[[Any], Mapping[Result, Outcome]]
    replies: Mapping[Result, Reply] = field(default_factory=dict)
    # the reply text the check words itself for a result, its variable parts in capitals
    # (`check-config` shows it; `replies` has the text for the results it does not word)
    worded: Mapping[Result, str] = field(default_factory=dict)
    # macros the check reads, by stage, so that negotiation can ask the MTA for them
    macros: Mapping[Stage, tuple[str, ...]] = field(default_factory=dict)
    needs_body: bool = False  # the MTA must send the body (DKIM, ARC)
    # A transformation (signing, sealing) gives no verdict: it runs after the verdict, for
    # every message not refused, whatever let it through (`accept` included).
    transform: bool = False
    after_headers: bool = False  # runs after our Authentication-Results is written (ARC seal)
    needs_dkim: bool = False  # reads the DKIM findings: verified first if no rule did
