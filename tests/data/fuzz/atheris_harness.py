"""Coverage-guided fuzzing of the hypothesis fuzz targets with atheris (libFuzzer), for ad-hoc
runs; the test suite never needs atheris. The invariants are the ones of tests/unit/test_fuzz_*.

    pip install atheris   # not a project dependency
    python tests/data/fuzz/atheris_harness.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of spf_record, spf_macro, dmarc_record, header_value, ar_header. With no
CORPUS_DIR the inputs of tests/data/fuzz/TARGET are written to a temporary seed directory.
Inputs that fail go to crash-* files: decode them with `surrogateescape` UTF-8, add them to
TARGET/regressions.txt (escaped as the README says) and fix the bug.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-not-found]

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "unit"), str(HERE.parents[2] / "src")]

with atheris.instrument_imports():
    import test_fuzz_dmarc
    import test_fuzz_headers
    import test_fuzz_spf
    from test_fuzz_corpus import corpus

    from mailwarden.spf.macro import MacroContext
    from mailwarden.transaction import CheckResult


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def spf_record(data: bytes) -> None:
    test_fuzz_spf.check_record(text(data))


def spf_macro(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    exp = provider.ConsumeBool()
    sender = provider.ConsumeUnicode(40)
    helo = provider.ConsumeUnicode(20)
    local, _, domain = sender.rpartition("@")
    ctx = MacroContext(sender, local or "postmaster", domain, helo or "example.com",
                       "1.2.0.192", "192.0.2.1", "in-addr", helo, "mx.example.com", 0,
                       test_fuzz_spf.Calls("mail.example.com"))
    test_fuzz_spf.check_macro(provider.ConsumeUnicode(4096), exp, ctx)


def dmarc_record(data: bytes) -> None:
    test_fuzz_dmarc.check_record(text(data))


def header_value(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    value, comment = provider.ConsumeUnicode(300), provider.ConsumeUnicode(100)
    keys = ("smtp.mailfrom", "header.d", "policy.iprev")
    results = [CheckResult("r", "spf", "fail", properties=((key, value),), comment=comment)
               for key in keys]
    results.append(CheckResult("r", "dkim", "pass", properties=tuple((k, value) for k in keys)))
    test_fuzz_headers.check_ar(results)


def ar_header(data: bytes) -> None:
    test_fuzz_headers.check_forged([text(data)])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "spf_record": spf_record, "spf_macro": spf_macro, "dmarc_record": dmarc_record,
    "header_value": header_value, "ar_header": ar_header,
}


def main() -> None:
    target, args = sys.argv[1], sys.argv[2:]
    if not any(not arg.startswith("-") for arg in args):
        seeds = Path(tempfile.mkdtemp(prefix=f"seeds-{target}-"))
        for index, seed in enumerate(corpus(target)):
            (seeds / f"{index:04}").write_bytes(seed.encode("utf-8", "surrogateescape"))
        args.append(str(seeds))
    atheris.Setup([sys.argv[0], *args], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
