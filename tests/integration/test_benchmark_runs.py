"""The benchmarks still run and report their tables (smoke tests; no timing is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_spf_benchmark_prints_ratios_and_agrees_with_pyspf() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "spf_bench.py"), "--seconds", "0.3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pyspf disagrees on 0" in done.stdout
    for cache in ("cold", "warm"):
        assert re.search(rf"^{cache} +[\d,]+ +[\d,]+ +\d+\.\d\dx", done.stdout, re.MULTILINE), (
            done.stdout)


POSTFIX_BENCH_TOOLS = ("/usr/sbin/postfix", "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink",
                       "/usr/sbin/opendkim")


@pytest.mark.skipif(os.geteuid() != 0 or not all(os.access(tool, os.X_OK)
                                                 for tool in POSTFIX_BENCH_TOOLS),
                    reason="needs root, Postfix (with smtp-source and smtp-sink) and OpenDKIM")
def test_postfix_benchmark_runs_every_case_end_to_end() -> None:
    """benchmarks/postfix_bench.py at 50 messages per case: every case is measured (the
    OpenDMARC one may say why it was skipped), the sampled headers check out, the rates are
    positive and the ceiling's ratio is 1.00x."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "postfix_bench.py"), "--messages", "50",
         "--sample", "5", "--rounds", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for transport in ("libmilter", "native"):
        assert re.search(rf"^\[{transport}\] inbound / no rules, same transport: +\d+\.\d\dx",
                         done.stdout, re.MULTILINE), done.stdout
    signed = "5 sampled: DKIM-Signature d=bench.example, verifies"
    inbound = "5 sampled: Authentication-Results spf=pass dkim=pass dmarc=pass"
    expected = {"no milter (ceiling)": "5 sampled: delivered", "OpenDKIM signing": signed,
                "OpenDKIM verify + OpenDMARC": inbound}
    for transport in ("libmilter", "native"):
        expected[f"mailwarden no rules [{transport}]"] = "5 sampled: delivered"
        expected[f"mailwarden signing [{transport}]"] = signed
        expected[f"mailwarden SPF+DKIM+DMARC [{transport}]"] = inbound
    assert len(re.findall(r"^round \d of 2$", done.stdout, re.MULTILINE)) == 2, done.stdout
    for name, check in expected.items():
        # median rate, the rounds' range, the median same-round ratio and its range, CPU ms
        # per message of the machine and of the milters
        row = re.search(rf"^{re.escape(name)} +([\d,]+) +([\d,]+)-([\d,]+) +"
                        rf"(\d+\.\d\d)x \((\d+\.\d\d)-(\d+\.\d\d)\) +"
                        rf"(\d+\.\d\d) +(\d+\.\d\d) +(.*)$",
                        done.stdout, re.MULTILINE)
        if row is None and "OpenDMARC" in name:
            assert re.search(rf"^{re.escape(name)} +- +- +skipped: ", done.stdout,
                             re.MULTILINE), done.stdout
            continue
        assert row is not None, done.stdout
        median, low, high = (int(row.group(i).replace(",", "")) for i in (1, 2, 3))
        assert 0 < low <= median <= high, done.stdout
        ratio, ratio_low, ratio_high = (float(row.group(i)) for i in (4, 5, 6))
        assert 0 < ratio_low <= ratio <= ratio_high, done.stdout
        machine, milters = float(row.group(7)), float(row.group(8))
        assert machine > 0 and (milters > 0) == (name != "no milter (ceiling)"), done.stdout
        assert row.group(9) == check, done.stdout
    assert re.search(r"^no milter \(ceiling\) .* 1\.00x \(1\.00-1\.00\) ", done.stdout,
                     re.MULTILINE)
    for transport in ("libmilter", "native"):
        assert re.search(rf"^\[{transport}\] signing / OpenDKIM: +\d+\.\d\dx \(", done.stdout,
                         re.MULTILINE), done.stdout
    assert re.search(r"^no rules, libmilter / native: +\d+\.\d\dx \(", done.stdout,
                     re.MULTILINE), done.stdout


def _verify_bench_skip_reason() -> str | None:
    from opendkim import opendkim_available
    from opendmarc import namespace_problem, opendmarc_available

    if not opendkim_available():
        return "OpenDKIM is not installed (Debian package 'opendkim')"
    if not opendmarc_available():
        return "OpenDMARC is not installed (Debian package 'opendmarc')"
    return namespace_problem()


def test_verify_benchmark_runs_with_right_verdicts() -> None:
    """benchmarks/verify_bench.py, briefly: both stacks answer every message with spf, dkim and
    dmarc pass (the benchmark checks each one) and the ratio table is printed."""
    reason = _verify_bench_skip_reason()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "verify_bench.py"), "--seconds", "0.5",
         "--connections", "2", "--sizes", "4"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^verdict mismatches: 0 of [1-9]", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^ +4K +2 +[\d,]+ +[\d,]+ +\d+\.\d\dx", done.stdout, re.MULTILINE), (
        done.stdout)
