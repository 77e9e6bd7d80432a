"""How much of a message's header the checks keep (`limits.header_*`), whatever the sender
sends: the message itself is never refused for its header."""

from __future__ import annotations

from mailwarden.config import LimitsConfig
from mailwarden.headers import AR, authserv_id_of

# An Authentication-Results field over the header limits is kept as no more than this much of
# its beginning: enough to read whose it is (RFC 8601 §5: ours are deleted, by position).
AR_HEAD = 1024
# From fields kept past the header limits: DMARC needs the author, and two tell it there are
# several (RFC 9989 §4.4).
FROM_OVER_LIMIT = 2
_AR_LOWER = AR.lower()


class HeaderBudget:
    """The header fields of one message as `limits.header_*` lets the checks keep them.

    A field longer than `header_field_bytes` is cut to that length. From the first field past
    `header_fields` fields or `header_bytes` bytes on, fields are counted and not kept (so what
    the checks see is the top of the header, whole), except the first two From fields
    (DMARC must see the author) and every Authentication-Results field (its position decides
    which to delete), which is then kept as its first `AR_HEAD` bytes; one whose authserv-id
    cannot be read there counts as claiming ours, so that a forgery cannot hide behind its
    size."""

    def __init__(self) -> None:
        self.fields = 0  # seen
        self.kept = 0
        self.size = 0  # bytes kept
        self.dropped = 0  # fields not kept (or kept as a stand-in)
        self.cut = 0  # fields cut to header_field_bytes
        self.from_fields = 0
        self.full = False  # a field did not fit: no later one is kept either (but see above)

    @property
    def over(self) -> bool:
        return bool(self.dropped or self.cut)

    def take(self, name: str, value: str, limits: LimitsConfig, authserv_id: str
             ) -> tuple[str, str] | None:
        """The (name, value) to keep of one header field, or None."""
        self.fields += 1
        raw = value.encode("utf-8", "surrogateescape")
        whole = len(raw) <= limits.header_field_bytes
        if not whole:
            self.cut += 1
            raw = raw[:limits.header_field_bytes]
            value = raw.decode("utf-8", "surrogateescape")
        size = len(name) + len(raw) + 2
        lower = name.lower()
        self.full = self.full or self.kept >= limits.header_fields or \
            self.size + size > limits.header_bytes
        fits = not self.full
        if lower == "from":
            self.from_fields += 1
            fits = fits or self.from_fields <= FROM_OVER_LIMIT
        elif lower == _AR_LOWER and (not fits or not whole):
            value = _ar_stand_in(value, whole, authserv_id)
            size = len(name) + len(value)
            fits = True
            self.dropped += 1
        if not fits:
            self.dropped += 1
            return None
        self.kept += 1
        self.size += size
        return name, value

    def describe(self) -> str:
        parts = []
        if self.dropped:
            parts.append(f"{self.dropped} of {self.fields} header fields left out of the "
                         "checks (limits.header_fields, limits.header_bytes)")
        if self.cut:
            parts.append(f"{self.cut} header fields cut to limits.header_field_bytes")
        return "; ".join(parts)


def _ar_stand_in(value: str, whole: bool, authserv_id: str) -> str:
    """What is kept of an Authentication-Results field over the limits: its first AR_HEAD
    characters when they show its authserv-id, else a value that claims ours."""
    head = value[:AR_HEAD]
    claimed = authserv_id_of(head)
    complete = whole and len(head) == len(value)
    if claimed and (complete or not head.rstrip().lower().endswith(claimed)):
        return head
    return f" {authserv_id}; none"
