"""A tiny pymilter milter for the miltertest harness self-test.

Usage: python tinymilter.py SOCKET    (e.g. unix:/tmp/x/tiny.sock or inet:PORT@127.0.0.1)

What it does:
* connect() is @noreply (SMFIP_NR_CONN) and remembers the client IP.
* envfrom() rejects "<reject@...>" with "550 5.7.1 sender rejected by tinymilter".
* eom() inserts "X-Tiny-Milter: client=<ip>; qid=<EOM macro i>" at index 0 and accepts,
  or rejects with "550 5.7.1 message rejected by tinymilter" when the sender was
  "<reject-at-eom@...>".
All other callbacks are left to Milter.Base, so they are negotiated away (SMFIP_NO*).
"""

from __future__ import annotations

import sys

import Milter

HEADER = "X-Tiny-Milter"


class TinyMilter(Milter.Base):  # type: ignore[misc]
    def __init__(self) -> None:
        self.client = "unknown"
        self.sender = ""

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        if isinstance(hostaddr, tuple):
            self.client = str(hostaddr[0])
        return int(Milter.CONTINUE)

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.sender = mailfrom.strip("<>").lower()
        if self.sender.startswith("reject@"):
            self.setreply("550", "5.7.1", "sender rejected by tinymilter")
            return int(Milter.REJECT)
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        if self.sender.startswith("reject-at-eom@"):
            self.setreply("550", "5.7.1", "message rejected by tinymilter")
            return int(Milter.REJECT)
        qid = self.getsymval("i") or "none"
        self.addheader(HEADER, f"client={self.client}; qid={qid}", 0)
        return int(Milter.ACCEPT)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    Milter.factory = TinyMilter
    Milter.runmilter("tinymilter", argv[1], timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
