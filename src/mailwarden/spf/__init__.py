"""SPF (RFC 7208): record parsing, macro expansion, check_host() and Received-SPF."""

from mailwarden.spf.check import (
    Limits,
    Result,
    SPFResult,
    check_helo,
    check_host,
    check_mailfrom,
)
from mailwarden.spf.record import Directive, Modifier, Record, RecordError, parse_record

__all__ = [
    "Directive",
    "Limits",
    "Modifier",
    "Record",
    "RecordError",
    "Result",
    "SPFResult",
    "check_helo",
    "check_host",
    "check_mailfrom",
    "parse_record",
]
