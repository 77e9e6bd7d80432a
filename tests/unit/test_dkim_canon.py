"""The streamed body canonicalizer against dkimpy's (RFC 6376 §3.4.3 simple, §3.4.4 relaxed),
whatever the body and wherever the chunks are cut."""

from __future__ import annotations

import hashlib
import re

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.dkim.canon import BodyHasher, body_hash

LINE = st.tuples(
    st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b"x \t", b"\xc3\xa9"]),
             max_size=8).map(b"".join),
    st.sampled_from([b"\r\n", b"\n"]),
).map(b"".join)
BODY = st.lists(LINE, max_size=12).map(b"".join)


def reference(body: bytes, canonicalization: str) -> bytes:
    crlf = re.sub(rb"(?<!\r)\n", b"\r\n", body)  # dkimpy reads bare LF as CRLF
    algorithm = Simple if canonicalization == "simple" else Relaxed
    return hashlib.sha256(algorithm.canonicalize_body(crlf)).digest()


@settings(max_examples=400, deadline=None)
@given(BODY, st.lists(st.integers(min_value=0, max_value=200), max_size=5),
       st.sampled_from(["simple", "relaxed"]))
def test_any_chunking_gives_dkimpys_hash(body: bytes, cuts: list[int], canon: str) -> None:
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert body_hash(chunks, canon) == reference(body, canon)


def test_empty_bodies() -> None:
    """§3.4.3: an empty body is one CRLF under simple; §3.4.4: nothing under relaxed."""
    assert body_hash([], "simple") == hashlib.sha256(b"\r\n").digest()
    assert body_hash([b"\r\n\r\n"], "simple") == hashlib.sha256(b"\r\n").digest()
    assert body_hash([], "relaxed") == hashlib.sha256(b"").digest()
    assert body_hash([b"  \r\n\r\n"], "relaxed") == hashlib.sha256(b"").digest()


def test_body_length_limit_hashes_only_the_first_octets() -> None:
    """§3.5 l=: only that many octets of the canonical body are hashed."""
    hasher = BodyHasher("relaxed", limit=5)
    hasher.update(b"Hello   world\r\n")
    assert hasher.digest() == hashlib.sha256(b"Hello").digest()


def test_relaxed_compresses_and_strips_white_space() -> None:
    assert body_hash([b"a  b\t c \t\r\n\r\n\r\n"], "relaxed") == \
        hashlib.sha256(b"a b c\r\n").digest()


def test_trailing_empty_lines_across_chunks_are_kept_when_text_follows() -> None:
    assert body_hash([b"a\r\n\r\n", b"\r\n", b"b\r\n\r\n"], "simple") == \
        hashlib.sha256(b"a\r\n\r\n\r\nb\r\n").digest()


def test_unknown_canonicalization_is_refused() -> None:
    try:
        BodyHasher("nofws")
    except ValueError as exc:
        assert "nofws" in str(exc)
    else:
        raise AssertionError("nofws was accepted")


@settings(max_examples=300, deadline=None)
@given(BODY, st.lists(st.integers(min_value=0, max_value=200), max_size=5),
       st.sampled_from(["simple", "relaxed"]))
def test_mta_bodies_hash_the_same_without_the_line_end_search(body: bytes, cuts: list[int],
                                                               canon: str) -> None:
    """crlf=True (a body from the MTA, CRLF only) skips the bare-LF search, same hash."""
    body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert body_hash(chunks, canon, crlf=True) == reference(body, canon)
