"""The state of one SMTP connection and of the message being received on it.

Built stage by stage by the milter adapter (or by a test, or the offline `test` command); checks
read it and append their results; the engine knows nothing else about the MTA.
"""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mailwarden.dns import IPAddress


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One authentication or policy result.

    `method` and `properties` are RFC 8601 vocabulary (`spf`, `smtp.mailfrom`, ...); results with
    `report=False` (relay checks) stay out of Authentication-Results but are logged."""

    rule: str
    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    comment: str | None = None
    report: bool = True

    def short(self) -> str:
        identity = next((v for k, v in self.properties if k.startswith("smtp.")), "")
        return f"{self.method}={self.result}" + (f"({identity})" if identity else "")


@dataclass(frozen=True, slots=True)
class Monitored:
    """A verdict a rule in monitor mode would have given, logged and counted, not applied."""

    stage: str
    action: str  # reject | tempfail | quarantine | discard
    rule: str
    reply: str = ""  # "550 5.7.1 text" for reject and tempfail
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.action} by rule {self.rule!r} at {self.stage}"
        return text + (f' reply="{self.reply}"' if self.reply else
                       f' reason="{self.reason}"' if self.reason else "")


@dataclass(slots=True)
class Transaction:
    # -- the connection --------------------------------------------------------------------
    client_ip: IPAddress | None = None
    client_name: str = ""  # the MTA's view of the client's name ("unknown", "[192.0.2.1]", ...)
    client_port: int = 0
    helo: str | None = None
    macros: dict[str, str] = field(default_factory=dict)
    connection_results: list[CheckResult] = field(default_factory=list)
    connection_accepted: bool = False  # an `accept` or `quarantine` verdict at connect/helo
    connection_quarantine: str | None = None
    connection_monitored: list[Monitored] = field(default_factory=list)
    # -- the message -----------------------------------------------------------------------
    queue_id: str = ""
    mail_from: str | None = None  # None before MAIL FROM; "" is the null reverse-path
    mail_params: tuple[str, ...] = ()
    rcpts: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_size: int = 0
    body: IO[bytes] | None = None  # spooled to a temporary file past the threshold
    spool_threshold: int = 1024 * 1024
    authentication_results: str = ""  # our header's value, once written (for ARC sealing)
    dkim: list[Any] = field(default_factory=list)  # DKIM SignatureResults, for DMARC
    arc: tuple[str, tuple[str, ...]] | None = None  # ARC chain result and sealers
    results: list[CheckResult] = field(default_factory=list)
    add_headers: list[tuple[str, str]] = field(default_factory=list)  # in order, top first
    accepted: bool = False  # an `accept` verdict for this message: no further rules
    quarantine: str | None = None
    monitored: list[Monitored] = field(default_factory=list)  # what enforcement would do
    messages: int = 0  # messages begun on this connection
    _message: bytes | None = None

    def add_body(self, chunk: bytes) -> None:
        """A piece of the body, with CRLF line ends as the MTA sends them (DKIM relies on it)."""
        if self.body is None:
            self.body = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in new_message)
                max_size=self.spool_threshold)
        self.body.write(chunk)
        self.body_size += len(chunk)
        self._message = None

    def header_block(self) -> bytes:
        """The header fields exactly as the MTA passed them (CRLF line ends), and the empty
        line that ends them."""
        lines = []
        for name, value in self.headers:
            value = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}:{value}\r\n".encode("utf-8", "surrogateescape"))
        return b"".join(lines) + b"\r\n"

    def body_chunks(self, size: int = 256 * 1024) -> Iterator[bytes]:
        """The body, read back from the spool a chunk at a time."""
        if self.body is None:
            return
        self.body.seek(0)
        try:
            while chunk := self.body.read(size):
                yield chunk
        finally:
            self.body.seek(0, 2)

    def message(self) -> bytes:
        """The whole message in memory (for ARC, which dkimpy needs whole)."""
        if self._message is None:
            self._message = self.header_block() + b"".join(self.body_chunks())
        return self._message

    def header_values(self, name: str) -> list[str]:
        return [value.strip() for field_name, value in self.headers
                if field_name.lower() == name.lower()]

    @classmethod
    def for_client(cls, ip: str | None, name: str = "", port: int = 0) -> Transaction:
        address: IPAddress | None = None
        if ip:
            try:
                address = ipaddress.ip_address(ip.strip("[]"))
            except ValueError:
                address = None
        return cls(client_ip=address, client_name=name, client_port=port)

    def new_message(self) -> None:
        """MAIL FROM (or an abort) starts a new message on the same connection."""
        self.queue_id = ""
        self.mail_from = None
        self.mail_params = ()
        self.rcpts = []
        self.headers = []
        self.body_size = 0
        if self.body is not None:
            self.body.close()
        self.body = None
        self._message = None
        self.authentication_results = ""
        self.dkim = []
        self.arc = None
        self.results = list(self.connection_results)
        self.add_headers = []
        self.accepted = self.connection_accepted
        self.quarantine = self.connection_quarantine
        self.monitored = list(self.connection_monitored)
        self.messages += 1

    @property
    def auth_user(self) -> str:
        return self.macros.get("{auth_authen}", "")

    @property
    def authenticated(self) -> bool:
        return bool(self.auth_user)

    @property
    def sender_domain(self) -> str:
        if not self.mail_from:
            return ""
        return self.mail_from.rpartition("@")[2].lower().rstrip(".")

    @property
    def rcpt_domains(self) -> list[str]:
        return [r.rpartition("@")[2].lower().rstrip(".") for r in self.rcpts]

    @property
    def client(self) -> str:
        ip = str(self.client_ip) if self.client_ip is not None else "unknown"
        name = self.client_name or "unknown"
        if name.startswith("[") and name.endswith("]"):
            # Postfix names a client without a verified name by its "[address]"
            name = "unknown"
        return f"{name}[{ip}]"
