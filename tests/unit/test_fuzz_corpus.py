"""The fuzz corpus (tests/data/fuzz, format in its README.md): the loader the test_fuzz_*
modules share, the hypothesis strategies that mutate and splice its inputs, and checks that
the corpus itself is well formed."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[1] / "data" / "fuzz"
TARGETS = ("spf_record", "spf_macro", "dmarc_record", "header_value", "ar_header", "helo",
           "mail_from", "from_header")

# Every fuzz test: the same examples on every run (CI reproduces a failure as is), no example
# database, and a budget (`max_examples`) sized so that all test_fuzz_* modules together stay
# well under 30 s.
_FUZZ = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def budget(max_examples: int) -> settings:
    return settings(_FUZZ, max_examples=max_examples)


_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|\*\{([0-9]+)\}|(.))", re.DOTALL)
_SIMPLE = {"\\": "\\", "r": "\r", "n": "\n", "t": "\t", "0": "\0"}


class CorpusError(ValueError):
    pass


def decode(line: str) -> str:
    """One corpus line to its input (see tests/data/fuzz/README.md)."""
    out: list[str] = []
    pos = 0
    for match in _ESCAPE.finditer(line):
        if match.start() > pos:
            out.append(line[pos : match.start()])
        pos = match.end()
        hex2, hex4, repeat, simple = match.groups()
        if hex2 or hex4:
            out.append(chr(int(hex2 or hex4, 16)))
        elif repeat is not None:
            if not out:
                raise CorpusError(f"\\*{{{repeat}}} with nothing before it in {line!r}")
            out.append(out[-1][-1] * int(repeat))
        elif simple in _SIMPLE:
            out.append(_SIMPLE[simple])
        else:
            raise CorpusError(f"unknown escape \\{simple} in {line!r}")
    if "\\" in line[pos:]:
        raise CorpusError(f"a lone backslash ends {line!r}")
    out.append(line[pos:])
    return "".join(out)


@functools.cache
def entries(target: str) -> tuple[tuple[str, str], ...]:
    """(id, input) of every input of `target`; the id is file:line."""
    found = []
    for path in sorted((FUZZ / target).glob("*.txt")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if line and not line.startswith("#"):
                found.append((f"{path.stem}:{number}", decode(line)))
    return tuple(found)


def corpus(target: str) -> list[str]:
    return [text for _, text in entries(target)]


def examples(target: str) -> list[object]:
    """`target`'s inputs as pytest parameters named file:line."""
    return [pytest.param(text, id=f"{target}/{name}") for name, text in entries(target)]


# -- strategies -------------------------------------------------------------------------------
# Fragments that matter to the grammars under test: header specials, control characters, a
# lone surrogate (a byte the MTA sent that is not UTF-8), non-ASCII, SPF and DMARC syntax.
HOSTILE = ["\r", "\n", "\r\n", "\r\nX-Injected: yes", "\x00", "\t", " ", ";", '"', "\\", "(",
           ")", "@", ",", "=", ":", "<", ">", "[", "]", "é", "\u2028", "\ufeff", "\udcff",
           "\x7f", "%", "%{", "}", ".", "/", "//", "-", "+", "~", "?", "_", "0", "9", "32",
           "128", "a", "Z", "example.com", "mailto:a@example.com", "v=spf1 ", "v=DMARC1; "]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[str], fragments: list[str] = HOSTILE) -> str:
    """A corpus input with a few insertions, deletions, replacements, duplications or splices
    of another input."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(0, 4))):
        operation = draw(st.sampled_from(("insert", "delete", "replace", "splice", "double")))
        at = draw(st.integers(0, len(text)))
        if operation == "insert":
            piece = draw(st.one_of(st.sampled_from(fragments), st.text(max_size=4)))
            text = text[:at] + piece + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        elif operation == "replace" and text:
            at = min(at, len(text) - 1)
            text = text[:at] + draw(st.sampled_from(fragments)) + text[at + 1 :]
        elif operation == "splice":
            other = draw(st.sampled_from(seeds))
            cut = draw(st.integers(0, len(other)))
            text = text[:at] + other[cut:]
        else:
            text = text[:at] + text[at:] * draw(st.integers(2, 5))
    return text


def fuzzed(seeds: list[str], fragments: list[str] = HOSTILE) -> st.SearchStrategy[str]:
    """Mutated corpus inputs, fragment soup, and arbitrary text (non-ASCII, NUL, surrogates)."""
    return st.one_of(
        mutated(seeds, fragments),
        mutated(seeds, fragments),
        st.lists(st.sampled_from(fragments), max_size=30).map("".join),
        st.text(max_size=200),
        st.text(st.characters(codec=None, exclude_categories=()), max_size=60),
    )


# -- the corpus itself ------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_has_inputs(target: str) -> None:
    assert len(entries(target)) >= 5


def test_corpus_files_decode() -> None:
    for target in TARGETS:
        for path in (FUZZ / target).glob("*.txt"):
            assert path.read_bytes().endswith(b"\n"), path
            for line in path.read_text(encoding="utf-8").split("\n"):
                if line and not line.startswith("#"):
                    decode(line)


@pytest.mark.parametrize(("line", "text"), [
    ("plain", "plain"),
    ("a\\\\b", "a\\b"),
    ("\\r\\n\\t\\0", "\r\n\t\0"),
    ("\\x41\\u00e9\\udcff", "A\u00e9\udcff"),
    ("ab\\*{3}c", "abbbbc"),
    ("\\x20\\*{2}", "   "),
])
def test_decode(line: str, text: str) -> None:
    assert decode(line) == text


@pytest.mark.parametrize("line", ["\\q", "\\*{2}", "trailing\\", "\\x4"])
def test_decode_refuses_unknown_escapes(line: str) -> None:
    with pytest.raises(CorpusError):
        decode(line)
