"""The SPF benchmark still runs and reports its table (a smoke test; no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
