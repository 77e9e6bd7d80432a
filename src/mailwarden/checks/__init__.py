"""The checks a rule can run. Each is a `CheckSpec`: where it may run, the results it gives,
how its arguments are read from the config, the verdict each result gets by default, and the
function that does the work (pure logic over the Transaction and the shared resolver)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailwarden.config import Outcome, Reply
from mailwarden.dns import DNSClient
from mailwarden.findings import Finding
from mailwarden.relay import HostGroup, Membership
from mailwarden.transaction import CheckResult, Transaction

if TYPE_CHECKING:
    from mailwarden.config import Config, Section


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
            member = self.groups[name].membership(txn.client_ip, self.dns)
            if member is Membership.IN:
                return member
            unknown = unknown or member is Membership.UNKNOWN
        return Membership.UNKNOWN if unknown else Membership.OUT

    def store(self) -> Any:
        """The recording path into the DMARC report store (a `mailwarden.dmarc.store.Recorder`:
        its `record()` never raises), made on first use; it opens the store in this process
        (never across fork), and a store that cannot be opened or written costs report rows,
        never a verdict."""
        with self._store_lock:
            if self._store is None:
                from mailwarden.dmarc.store import Recorder

                self._store = Recorder(self.config.dmarc.store)
            return self._store


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What one run of a check found: the result the rule acts on, every result to record,
    headers to add, the text for an SMTP reply should the rule refuse, and the typed findings
    the engine files for the checks that depend on this one."""

    decisive: str
    results: tuple[CheckResult, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    text: str = ""
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    stages: tuple[str, ...]
    results: tuple[str, ...]
    parse_args: Callable[[Section, Config], Any]
    run: Callable[[Context, Transaction, Any], CheckOutcome]
    outcomes: Callable[[Any], Mapping[str, Outcome]]
    replies: Mapping[str, Reply] = field(default_factory=dict)
    # macros the check reads, by stage, so that negotiation can ask the MTA for them
    macros: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    needs_body: bool = False  # the MTA must send the body (DKIM, ARC)
    # A transformation (signing, sealing) gives no verdict: it runs after the verdict, for
    # every message not refused, whatever let it through (`accept` included).
    transform: bool = False
    after_headers: bool = False  # runs after our Authentication-Results is written (ARC seal)
    needs_dkim: bool = False  # reads the DKIM findings: verified first if no rule did


def _registry() -> dict[str, CheckSpec]:
    from mailwarden.checks import arc, dkim, dmarc, iprev, relay, spf

    specs = [spf.SPEC, relay.MAIL_RELAY, relay.RCPT_RELAY, iprev.SPEC, dkim.VERIFY, dkim.SIGN,
             arc.VERIFY, arc.SEAL, dmarc.SPEC]
    return {spec.name: spec for spec in specs}


class _LazyChecks(Mapping[str, CheckSpec]):
    """The registry, built on first use (the check modules import config, which imports us)."""

    _specs: dict[str, CheckSpec] | None = None

    def _get(self) -> dict[str, CheckSpec]:
        if self._specs is None:
            self._specs = _registry()
        return self._specs

    def __getitem__(self, key: str) -> CheckSpec:
        return self._get()[key]

    def __iter__(self) -> Any:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


CHECKS: Mapping[str, CheckSpec] = _LazyChecks()
