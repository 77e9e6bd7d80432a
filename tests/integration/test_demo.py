"""The one-command demo (demo/demo.py, `make demo`) runs and every message has the outcome it
shows off, so the demo never rots."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

Run = tuple[dict[str, Any], str]  # outcomes by name, and what the demo printed
DEMO = Path(__file__).resolve().parents[2] / "demo" / "demo.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="Postfix is not installed (scripts/setup.sh --test)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo's Postfix needs root"),
]


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailwarden_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run() -> Run:
    demo = load_demo()
    out = io.StringIO()
    outcomes = demo.run_demo(out)
    return {o.name: o for o in outcomes}, out.getvalue()


def test_every_message_has_the_expected_outcome(run: Run) -> None:
    outcomes, printed = run
    assert set(outcomes) == {"legit", "spoof", "relay", "impersonation", "arc", "outgoing"}
    wrong = {name: o.problems for name, o in outcomes.items() if not o.ok}
    assert not wrong, printed
    assert "6 of 6 messages had the expected outcome" in printed


def test_legitimate_mail_passes_spf_dkim_and_dmarc(run: Run) -> None:
    legit = run[0]["legit"]
    assert legit.code == 250 and legit.delivered
    results = legit.our_results()
    for want in ("spf=pass smtp.mailfrom=statements@bank.example", "dkim=pass",
                 "header.d=bank.example", "dmarc=pass", "header.from=bank.example"):
        assert want in results, results
    assert legit.header("Received-SPF")[0].startswith("pass ")


def test_spoofed_from_is_rejected_by_dmarc(run: Run) -> None:
    spoof = run[0]["spoof"]
    assert (spoof.stage, spoof.code) == ("DATA", 550)
    assert spoof.reply.startswith("550 5.7.1 ") and "bank.example" in spoof.reply
    assert not spoof.delivered


def test_relay_attempt_is_refused(run: Run) -> None:
    relay = run[0]["relay"]
    assert (relay.stage, relay.code) == ("RCPT TO", 554)
    assert relay.reply == "554 5.7.1 <victim@elsewhere.example>: Relay access denied"
    impersonation = run[0]["impersonation"]
    assert (impersonation.stage, impersonation.code) == ("MAIL FROM", 554)


def test_mailing_list_mail_passes_through_trusted_arc(run: Run) -> None:
    arc = run[0]["arc"]
    assert arc.code == 250 and arc.delivered
    results = arc.our_results()
    assert "dkim=fail" in results and "header.d=club.example" in results, results
    assert "arc=pass" in results and "arc.chain=lists.example" in results, results
    assert "dmarc=fail" in results and "override=local_policy" in results, results
    assert "header.from=club.example" in results, results
    assert arc.header("ARC-Seal") and "d=lists.example" in arc.header("ARC-Seal")[0]


def test_outgoing_mail_is_signed_by_mailwarden(run: Run) -> None:
    outgoing = run[0]["outgoing"]
    assert outgoing.code == 250 and outgoing.delivered
    assert "d=ours.example" in outgoing.header("DKIM-Signature")[0]
    assert any("d=ours.example pass" in note for note in outgoing.notes)
