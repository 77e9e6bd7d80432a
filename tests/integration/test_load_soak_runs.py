"""benchmarks/load_soak.py still runs end to end and reports every figure (a smoke test at
50 sessions for a few seconds; no timing is asserted, the error count must be 0)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("/usr/sbin/postfix", "/usr/sbin/smtp-sink")


@pytest.mark.skipif(os.geteuid() != 0 or not all(os.access(t, os.X_OK) for t in TOOLS),
                    reason="needs root and Postfix (with smtp-sink)")
def test_load_soak_reports_throughput_latency_errors_and_memory() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_soak.py"), "--sessions", "50",
         "--duration", "8", "--baseline", "4", "--warmup", "2", "--interval", "1",
         "--sample", "3",
         # a few seconds say nothing about growth: the verdict is printed, not judged here
         "--growth-limit", "1000"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    number = r"[\d,]+(?:\.\d+)?"
    for phase in ("baseline \\(no milter\\)", "mailwarden inbound"):
        assert re.search(rf"^{phase}: +{number} messages in \d+ s: {number} msg/s, latency p50 "
                         rf"{number} ms, p99 {number} ms, errors 0, peak open sessions 50\b",
                         out, re.MULTILINE), out
    assert "3 sampled: Authentication-Results spf=pass dkim=pass dmarc=pass" in out, out
    assert re.search(rf"^added latency: p50 [+-]{number} ms, p99 [+-]{number} ms$", out,
                     re.MULTILINE), out
    assert re.search(r"^errors: 0$", out, re.MULTILINE), out
    assert re.search(rf"^mailwarden peak RSS: {number} MiB \(master \+ workers, \d+ processes; "
                     rf"peak PSS, shared pages counted once: {number} MiB\), peak threads: \d+$",
                     out, re.MULTILINE), out
    assert re.search(rf"^mailwarden RSS: start {number} MiB \(after the warm-up\), end "
                     rf"{number} MiB after \d+ s \(\d+ samples, every 1 s\)$", out,
                     re.MULTILINE), out
    assert re.search(r"^memory: (stable|GROWS): ", out, re.MULTILINE), out
    report = json.loads(out.rsplit("json: ", 1)[1])
    assert report["errors"] == 0 and report["sessions"] == 50
    assert report["throughput_msg_s"] > 0 and report["baseline_msg_s"] > 0
    assert report["peak_rss_mib"] >= report["rss_start_mib"] > 0
    assert report["peak_threads"] > 2  # a master and workers, each with threads
    assert len(report["rss_samples_mib"]) >= 5
