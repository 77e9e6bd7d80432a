"""The state of one SMTP connection and of the message being received on it.

Built stage by stage by the milter adapter (or by a test, or the offline `test` command); checks
read it and append their results; the engine knows nothing else about the MTA.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import tempfile
from collections.abc import Container, Iterator
from dataclasses import dataclass, field

from mailwarden.deadline import Deadline
from mailwarden.dns import IPAddress
from mailwarden.findings import Findings
from mailwarden.outage import Outage
from mailwarden.results import Result
from mailwarden.verdict import Action, Stage

log = logging.getLogger("mailwarden.spool")


# Spooling of this process, per spool directory alike: a failure and a recovery logged once.
SPOOL_HEALTH = Outage()


def _spool_failed(where: str, exc: OSError) -> None:
    SPOOL_HEALTH.miss()
    if SPOOL_HEALTH.begin():
        log.error("cannot spool message bodies to %s (%s): keeping them in memory until "
                  "spooling works again", where, exc.strerror or exc)


def _spool_worked(where: str) -> None:
    kept = SPOOL_HEALTH.end()
    if kept is not None:
        log.warning("spooling message bodies to %s works again (%d bod%s kept in memory "
                    "meanwhile)", where, kept, "y was" if kept == 1 else "ies were")


class BodySpool:
    """A message body: in memory up to `threshold` bytes, past it in an unlinked temporary
    file in `directory` (None: tempfile's default, $TMPDIR or /tmp).

    When the file cannot be made or written (a read-only or full file system, a directory
    that is gone), the body stays in memory instead and the message is judged as usual: a
    spool failure never costs a verdict, only memory. Whatever had reached the file is read
    back first, so no byte is lost."""

    def __init__(self, threshold: int, directory: str | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self._memory: io.BytesIO | None = io.BytesIO()
        self._file: io.FileIO | None = None
        self._on_disk = 0  # bytes written to the file so far
        self._fell_back = False
        self._lost: OSError | None = None
        self.closed = False

    @property
    def spooled(self) -> bool:
        """Whether the body is in a file now."""
        return self._file is not None

    def _where(self) -> str:
        return self.directory or tempfile.gettempdir()

    def write(self, data: bytes) -> int:
        if self.closed:
            raise ValueError("write to a closed body spool")
        if self._lost is not None:  # reported once; reading the body will raise it
            return len(data)
        rest = data
        if self._file is not None:
            before = self._on_disk
            try:
                self._write_file(data)
                return len(data)
            except OSError as exc:
                rest = data[self._on_disk - before:]  # a part may have reached the file
                self._back_to_memory(exc)
        if self._memory is None:  # lost just now
            return len(data)
        self._memory.write(rest)
        if not self._fell_back and self._memory.tell() > self.threshold:
            self._roll_over()
        return len(data)

    def _write_file(self, data: bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = self._file.write(view)  # raw (unbuffered): a short write is possible
            if not written:
                raise OSError(f"short write to the spool file in {self._where()}")
            self._on_disk += written
            view = view[written:]

    def _roll_over(self) -> None:
        assert self._memory is not None
        try:
            spool = tempfile.TemporaryFile(dir=self.directory, buffering=0)  # noqa: SIM115
        except OSError as exc:
            self._fell_back = True
            _spool_failed(self._where(), exc)
            return
        assert isinstance(spool, io.FileIO)
        self._file, self._on_disk = spool, 0
        pending, self._memory = self._memory.getvalue(), None
        try:
            self._write_file(pending)
        except OSError as exc:
            self._back_to_memory(exc, pending)

    def _back_to_memory(self, exc: OSError, whole: bytes | None = None) -> None:
        """The file failed: continue in memory with everything written so far (`whole`, or
        what the file holds). If even that cannot be read back, the body is lost: reading it
        raises, and the message is tempfailed rather than judged on part of its body."""
        spool, self._file = self._file, None
        assert spool is not None
        self._fell_back = True
        _spool_failed(self._where(), exc)
        try:
            if whole is None:
                spool.seek(0)
                whole = spool.readall()
                if len(whole) != self._on_disk:
                    raise OSError(f"read back {len(whole)} of {self._on_disk} bytes")
        except OSError as lost:
            self._lost = OSError(f"the message body was lost from the spool file in "
                                 f"{self._where()} ({lost})")
            log.error("%s", self._lost)
            return
        finally:
            spool.close()
        self._memory = io.BytesIO(whole)
        self._memory.seek(0, io.SEEK_END)

    def _stream(self) -> io.RawIOBase | io.BufferedIOBase:
        if self._lost is not None:
            raise self._lost
        stream = self._file if self._file is not None else self._memory
        if stream is None:
            raise ValueError("I/O on a closed body spool")
        return stream

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream().seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        return self._stream().read(size) or b""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
            if not self._fell_back:
                _spool_worked(self._where())
        self._memory = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One authentication or policy result.

    `method` and `properties` are RFC 8601 vocabulary (`spf`, `smtp.mailfrom`, ...); results with
    `report=False` (relay checks) stay out of Authentication-Results but are logged."""

    rule: str
    method: str
    result: Result
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

    stage: Stage
    action: Action  # reject | tempfail | quarantine | discard
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
    body: BodySpool | None = None  # in a temporary file past spool_threshold
    spool_threshold: int = 1024 * 1024
    spool_dir: str | None = None  # where; None: $TMPDIR or /tmp
    authentication_results: str = ""  # our header's value, once written (for ARC sealing)
    findings: Findings = field(default_factory=Findings)  # typed, filed by the engine
    results: list[CheckResult] = field(default_factory=list)
    add_headers: list[tuple[str, str]] = field(default_factory=list)  # in order, top first
    accepted: bool = False  # an `accept` (or quarantine) verdict: no further checks run
    quarantine: str | None = None
    header_cut: str = ""  # why the checks do not see the whole header (limits.header_*)
    monitored: list[Monitored] = field(default_factory=list)  # what enforcement would do
    messages: int = 0  # messages begun on this connection
    deadline: Deadline | None = None  # of the stage being judged: every wait of a check ends by it
    # `mailwarden test` asks why rules did not run: (stage, rule, why); the daemon never does
    explain: bool = False
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    _message: bytes | None = None

    def add_body(self, chunk: bytes) -> None:
        """A piece of the body, with CRLF line ends as the MTA sends them (DKIM relies on it)."""
        if self.body is None:
            self.body = BodySpool(self.spool_threshold, self.spool_dir)
        self.body.write(chunk)
        self.body_size += len(chunk)
        self._message = None

    def header_block(self, omit: Container[int] = ()) -> bytes:
        """The header fields exactly as the MTA passed them (CRLF line ends), but those at the
        indices in `omit`, and the empty line that ends them."""
        lines = []
        for index, (name, value) in enumerate(self.headers):
            if index in omit:
                continue
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
        self.findings = Findings()
        self.results = list(self.connection_results)
        self.add_headers = []
        self.accepted = self.connection_accepted
        self.quarantine = self.connection_quarantine
        self.header_cut = ""
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
