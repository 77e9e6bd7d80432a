"""The openspf RFC 7208 test suite, every test, against a real DNS server on loopback.

Each scenario's zone data is served by `DevDNSServer`; TIMEOUT entries are dropped queries. Where
the suite lists several acceptable results, any of them passes (see tests/data/spf-suite/README.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.spf import check_mailfrom

from helpers import SUITE_SCORE, make_resolver

SUITE = Path(__file__).parent.parent / "data" / "spf-suite" / "rfc7208-tests.yml"
SUITE_NAME = "openspf RFC 7208 suite"


def _cases() -> list[Any]:
    cases = []
    with SUITE.open(encoding="utf-8") as stream:
        for scenario in yaml.safe_load_all(stream):
            if not scenario:
                continue
            zone = scenario.get("zonedata") or {}
            for name, test in scenario["tests"].items():
                cases.append(pytest.param(scenario["description"], zone, test, id=name))
    return cases


CASES = _cases()


def test_suite_has_every_test() -> None:
    assert len(CASES) == 203


@pytest.mark.parametrize(("scenario", "zone", "test"), CASES)
def test_rfc7208(dns_server: DevDNSServer, scenario: str, zone: dict[str, Any],
                 test: dict[str, Any], request: pytest.FixtureRequest) -> None:
    dns_server.load(zone)
    resolver = make_resolver(dns_server)
    outcome = check_mailfrom(resolver, str(test["host"]), str(test["mailfrom"]),
                             str(test["helo"]), receiver="receiver.example.net")
    expected = test["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    ok = str(outcome.result) in allowed
    if ok and "explanation" in test:
        want = test["explanation"]
        ok = outcome.explanation is None if want == "DEFAULT" else outcome.explanation == want
    SUITE_SCORE.setdefault(SUITE_NAME, {})[request.node.callspec.id] = ok
    assert str(outcome.result) in allowed, (
        f"{scenario} / spec {test.get('spec')}: got {outcome.result} ({outcome.cause}), "
        f"want {allowed}")
    if "explanation" in test:
        want = test["explanation"]
        if want == "DEFAULT":
            assert outcome.explanation is None, outcome
        else:
            assert outcome.explanation == want, outcome
