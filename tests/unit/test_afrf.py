"""Failure reports (RFC 9991, RFC 6591 AFRF): when fo= asks for one, the fields, the
redaction, and the mail's MIME structure (RFC 5965 §2)."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re

import pytest

from mailwarden.dmarc.afrf import (
    Failure,
    content,
    failure_mail,
    feedback_fields,
    identity_alignment,
    is_feedback_report,
    redactor,
    triggers,
)

FAILURE = Failure(
    policy_domain="example.com", author_domain="news.example.com", source_ip="192.0.2.7",
    mail_from="bounce@evil.example", rcpts=("alice@ours.example", "bob@ours.example"),
    arrival=1765000000.0,
    headers=(("From", " Alice <alice@news.example.com>"), ("To", " bob@ours.example"),
             ("Cc", ' "carol x"@ours.example'), ("Subject", " click http://x.example/ now"),
             ("Received", " from a by b for <alice@ours.example>"),
             ("Message-ID", " <4711.alice@news.example.com>")),
    authentication_results="mx.ours.example; dmarc=fail header.from=news.example.com",
    dmarc_failed=True, failed_aligned=("dkim",), aligned_passes=(),
    failed_dkim=("example.com", "s1"),
    dkim_failures=(("example.com", "s1", "body hash mismatch"),), spf_failed=True,
    spf_domain="evil.example", spf_record="v=spf1 -all", delivery="reject")
KEY = b"k" * 32


@pytest.mark.parametrize(("fo", "change", "expected"), [
    ("0", {}, ("dmarc",)),
    ("", {}, ("dmarc",)),  # fo= absent is 0
    ("0", {"dmarc_failed": False, "aligned_passes": ("dkim",)}, ()),
    # fo=1: any mechanism without an aligned pass, even when DMARC passed
    ("1", {"dmarc_failed": False, "aligned_passes": ("dkim",)}, ("dmarc",)),
    ("1", {"dmarc_failed": False, "aligned_passes": ("dkim", "spf")}, ()),
    ("d", {}, ("dkim",)),
    ("d", {"dkim_failures": ()}, ()),
    ("s", {}, ("spf",)),
    ("s", {"spf_failed": False}, ()),
    ("0:d:s", {}, ("dmarc", "dkim", "spf")),
])
def test_fo_decides_whether_a_report_is_made(fo: str, change: dict[str, object],
                                             expected: tuple[str, ...]) -> None:
    assert triggers(fo, dataclasses.replace(FAILURE, **change)) == expected  # type: ignore[arg-type]


def test_identity_alignment_follows_rfc9991_and_rfc7489_in_legacy() -> None:
    # RFC 9991 §4: what failed to authenticate an aligned identifier
    assert identity_alignment(FAILURE) == "dkim"
    assert identity_alignment(dataclasses.replace(FAILURE, failed_aligned=("dkim", "spf"))) \
        == "dkim, spf"
    assert identity_alignment(dataclasses.replace(FAILURE, failed_aligned=())) == "none"
    # RFC 7489 §7.3.1: what produced an aligned identifier
    legacy = dataclasses.replace(FAILURE, legacy=True)
    assert identity_alignment(legacy) == "none"
    assert identity_alignment(dataclasses.replace(legacy, aligned_passes=("spf",))) == "spf"


def test_the_feedback_fields_rfc9991_requires() -> None:
    fields = feedback_fields("dmarc", FAILURE, redactor(None))
    names = [name for name, _ in fields]
    for required in ("Feedback-Type", "Version", "User-Agent", "Auth-Failure",
                     "Identity-Alignment", "Authentication-Results"):
        assert names.count(required) == 1, required
    values = dict(fields)
    assert values["Feedback-Type"] == "auth-failure" and values["Auth-Failure"] == "dmarc"
    assert [v for n, v in fields if n == "Original-Rcpt-To"] == [
        "<alice@ours.example>", "<bob@ours.example>"]
    # §4: DKIM-Domain/Selector for the failing aligned signature, SPF-DNS for aligned SPF
    assert (values["DKIM-Domain"], values["DKIM-Selector"]) == ("example.com", "s1")
    assert values["DKIM-Identity"] == "@example.com"  # RFC 6376 §3.5: no i= is @d=
    signed_by = dataclasses.replace(FAILURE, dkim_identities=(
        ("other.example", "s1", "x@other.example"), ("example.com", "s1", "news@example.com")))
    assert dict(feedback_fields("dmarc", signed_by, redactor(None)))["DKIM-Identity"] == \
        "news@example.com"
    assert "SPF-DNS" not in values
    spf = dataclasses.replace(FAILURE, failed_aligned=("spf",), failed_dkim=None)
    assert dict(feedback_fields("dmarc", spf, redactor(None)))["SPF-DNS"] == \
        "txt : evil.example : v=spf1 -all"
    assert values["Delivery-Result"] == "reject"
    assert dict(feedback_fields("dkim", FAILURE, redactor(None)))["Auth-Failure"] == "bodyhash"
    assert dict(feedback_fields("spf", FAILURE, redactor(None)))["Auth-Failure"] == "spf"


def test_redaction_is_keyed_consistent_and_everywhere() -> None:
    redact = redactor(KEY)
    item = content("dmarc", FAILURE, redact, "Ours")
    text = item.headers + "".join(f"{n}: {v}\n" for n, v in item.feedback)
    for local in ("<alice@", " alice@", "bob@", "carol", "bounce@"):
        assert local not in text, local
    alice = redact.local("alice")
    assert text.count(f"{alice}@") == 3  # From, Received, Original-Rcpt-To: the same hash
    assert redactor(b"other key" * 4).local("alice") != alice
    assert redactor(None).local("alice") == "alice"
    assert "http://" not in item.headers and "hxxp://x.example/" in item.headers
    assert "Message-ID: <4711.alice@news.example.com>" in item.headers  # left as it is


def test_the_mail_is_a_feedback_report_with_three_parts() -> None:
    item = content("dmarc", FAILURE, redactor(KEY), "Ours Org")
    data = failure_mail(item, "id1", "dmarc@ours.example", "ours.example", "ruf@example.com")
    assert b"\r\n" in data and not re.search(rb"[^\r]\n", data)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "feedback-report"
    assert message["MIME-Version"] == "1.0" and message["Message-ID"] == "<id1@ours.example>"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "message/feedback-report", "text/rfc822-headers"]
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))  # RFC 5322 §2.1.1
    assert is_feedback_report([("Content-Type", message["Content-Type"])])
    assert not is_feedback_report(FAILURE.headers)


def test_redaction_leaves_no_local_part_in_any_form() -> None:
    """Review findings: non-ASCII local-parts (RFC 6532), a percent-encoded address in a
    List-Unsubscribe URI, and the smtp.mailfrom of our Authentication-Results."""
    odd = dataclasses.replace(
        FAILURE,
        headers=(("To", " zoë.smith@ours.example"),
                 ("List-Unsubscribe", " <https://x.example/u?e=john%40rcpt.example>")),
        authentication_results="mx.ours.example; spf=fail smtp.mailfrom=bounce@evil.example")
    item = content("dmarc", odd, redactor(KEY), "Ours")
    text = item.headers + "".join(f"{n}: {v}\n" for n, v in item.feedback)
    for leak in ("zo", "smith", "john", "bounce"):
        assert leak not in text, (leak, text)
    assert "%40rcpt.example" in text and "@ours.example" in text  # domains stay
    # an identity without a local-part (DKIM's default i=@d) gets no invented one
    assert redactor(KEY).address("@example.com") == "@example.com"


def test_long_fields_are_folded_and_any_org_name_is_sent() -> None:
    results = "mx.ours.example; " + "; ".join(
        f"dkim=fail header.d=signer{n}.example header.s=selector{n} header.b=abcdefgh"
        for n in range(15))
    long = dataclasses.replace(FAILURE, authentication_results=results)
    item = content("dmarc", long, redactor(KEY), "Bücher GmbH")
    data = failure_mail(item, "id1", "dmarc@ours.example", "ours.example", "ruf@example.com")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = email.message_from_bytes(data, policy=email.policy.default)
    text = data.decode()
    feedback = text[text.index("Feedback-Type:"):text.index("\r\n--", text.index(
        "Feedback-Type:"))]
    assert all(len(line) <= 78 for line in feedback.split("\r\n")), feedback
    unfolded = feedback.replace("\r\n ", " ")
    assert "header.d=signer14.example" in unfolded
    assert "Bücher GmbH" in next(iter(message.iter_parts())).get_content()


def test_dkim_fields_describe_the_signature_auth_failure_names() -> None:
    two = dataclasses.replace(FAILURE, failed_dkim=("news.example.com", "n1"),
                              dkim_failures=(("other.example", "o1", "signature did not "
                                              "verify"), ("news.example.com", "n1", "body "
                                              "hash mismatch")))
    fields = dict(feedback_fields("dkim", two, redactor(None)))
    assert (fields["Auth-Failure"], fields["DKIM-Domain"]) == ("signature", "other.example")
    fields = dict(feedback_fields("dmarc", two, redactor(None)))
    assert (fields["Auth-Failure"], fields["DKIM-Domain"]) == ("dmarc", "news.example.com")
