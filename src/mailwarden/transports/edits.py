"""What a Decision asks of the MTA at the end of message, in the order to ask it, whatever the
transport: forged Authentication-Results deleted (last first, so that the positions of the
others hold), our fields inserted at the top (bottom-up, so that they stand in the Decision's
order), the quarantine. An action the MTA did not grant is skipped and logged once per
connection."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailwarden import milterproto as mp
from mailwarden.headers import AR
from mailwarden.stage import Decision

log = logging.getLogger("mailwarden.milter")


@dataclass(frozen=True, slots=True)
class DeleteHeader:
    name: str
    position: int  # 1-based among the fields of that name


@dataclass(frozen=True, slots=True)
class InsertHeader:
    name: str
    value: str  # as the MTA wants it: with or without its leading space


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


EditStep = DeleteHeader | InsertHeader | Quarantine


class EditPlanner:
    """One per MTA connection: remembers which refused actions were already logged."""

    def __init__(self) -> None:
        self._refused: set[str] = set()

    def steps(self, decision: Decision, actions: int, protocol: int, client: str
              ) -> list[EditStep]:
        """`actions` (SMFIF_*) the MTA granted, `protocol` (SMFIP_*) negotiated."""
        out: list[EditStep] = []
        edits = decision.edits
        if edits.delete and self._granted(actions, mp.F_CHGHDRS, "delete forged headers",
                                          client):
            out += [DeleteHeader(AR, position) for position in sorted(edits.delete,
                                                                      reverse=True)]
        if edits.insert and self._granted(actions, mp.F_ADDHDRS, "add headers", client):
            leading = bool(protocol & mp.P_HDR_LEADSPC)
            for name, value in reversed(edits.insert):
                if leading and not value.startswith((" ", "\t")):
                    value = " " + value
                elif not leading:
                    value = value.lstrip(" \t")
                out.append(InsertHeader(name, value))
        if decision.quarantine and self._granted(actions, mp.F_QUARANTINE, "quarantine",
                                                 client):
            out.append(Quarantine(decision.quarantine))
        return out

    def _granted(self, actions: int, action: int, what: str, client: str) -> bool:
        if actions & action:
            return True
        if what not in self._refused:
            self._refused.add(what)
            log.warning("the MTA does not let milters %s; skipped (client %s)", what, client)
        return False
