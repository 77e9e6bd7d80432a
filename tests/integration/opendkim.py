"""Debian's OpenDKIM (/usr/sbin/opendkim) as a milter on loopback, for interop tests and benchmarks.

    zone = {"rsa._domainkey.example.org": [{"TXT": dkim_txt_record(rsa_key_pem)}]}
    with DevDNSServer(zone) as dns, OpenDKIM(tmp_path / "odk", mode="sv",
            keys=[("example.org", "rsa", key_path)], dns=("127.0.0.1", dns.port)) as odk:
        with MilterClient(odk.socket) as client:          # benchmarks/milterload.py
            result = client.send_message(client_ip="127.0.0.1", ...)
        # Postfix: PostfixInstance(..., milter=odk.postfix_socket)

Everything below was checked against Debian bookworm's opendkim 2.11.0~beta2-8+deb12u1
("Compiled with OpenSSL 3.0", USE_UNBOUND, libmilter 1.0.1).

DNS on a non-standard port
==========================
This build resolves through libunbound. ``Nameservers 127.0.0.1@PORT`` works: OpenDKIM hands
each entry of that comma-separated list to unbound's ub_ctx_set_fwd(), which takes unbound's
"addr@port" syntax, and querying 127.0.0.1 is allowed this way. So `dns=(host, port)` becomes
``Nameservers host@port`` and every key lookup goes to the devdns server; /etc/resolv.conf is
not used. (Checked: with the wrong port, verification fails with "key DNS query failed"; without
Nameservers it asks the system resolver.) The alternative ``ResolverConfiguration FILE`` (an
unbound.conf with ``forward-zone: name: "." forward-addr: 127.0.0.1@PORT``) works too, but only
with ``do-not-query-localhost: no`` in its ``server:`` section; ``UnboundConfigFile`` is not a
parameter of this build ("unrecognized parameter"). No TrustAnchorFile is set, so keys are
"unprotected" (not DNSSEC-validated), which is OpenDKIM's default "UnprotectedKey none": a pass
stays a pass. No port-53 fallback is needed. libunbound caches answers for their TTL (devdns:
300 s), also negative ones: changing the zone after OpenDKIM looked a key up has no effect on
that process (use a fresh selector, or restart()).

Signing and Ed25519
===================
Mail is signed when the client IP is in InternalHosts (default here 127.0.0.0/8; the milter
CONNECT address, not the Received: chain) or the macro {auth_type} is set (OpenDKIM ignores
{auth_authen}; Postfix sends both after SMTP AUTH, and so does milterload with auth_authen),
and the From: address matches the SigningTable (``refile``: ``*@DOMAIN keyname``, one line per
key; all keys of a domain sign, with ``MultipleSignatures yes``). The KeyTable maps keyname to
``DOMAIN:SELECTOR:/path/to/key``. Other mail is verified (Mode "v" or "sv").
Both rsa-sha256 and ed25519-sha256 sign and verify (``opendkim -V`` lists ed25519-sha256). The
Ed25519 private key is read as a PKCS#8 PEM file ("BEGIN PRIVATE KEY", as written by
cryptography's ``PrivateFormat.PKCS8``); an RSA key as PKCS#1 or PKCS#8 PEM. But this version
has ONE ``SignatureAlgorithm`` per process (the KeyTable has no per-key algorithm): an RSA key
under ``SignatureAlgorithm ed25519-sha256`` fails ("EVP_PKEY_get1_RSA() failed" / "expecting an
rsa key") and vice versa. So OpenDKIM() derives SignatureAlgorithm from the keys and refuses a
mix: run one instance per algorithm (Postfix chains them: smtpd_milters = a, b). Verification
handles both algorithms in any instance.

Results
=======
Signing adds ``DKIM-Signature`` with SMFIR_INSHEADER at index 0 (value folded with "\\n\\t";
OpenDKIM negotiates SMFIP_HDR_LEADSPC, so header values travel with their leading space, both
ways: MilterResult.apply() knows). Verification inserts, also at index 0::

    Authentication-Results: mx.test.example;
        dkim=pass (2048-bit key; unprotected) header.d=example.org header.i=@example.org
        header.a=rsa-sha256 header.s=rsa header.b=c0A63Vec;
        dkim-atps=neutral

The authserv-id is the MTA's ``j`` macro (``AuthservID`` overrides it). Ed25519 results read
``dkim=pass header.d=... header.a=ed25519-sha256 header.s=...`` (no key size). Failures:
``dkim=fail reason="signature verification failed" (2048-bit key; unprotected) header.d=...``;
a selector without a record: ``dkim=fail reason="key not found in DNS" header.d=...``. Every
result ends with ``dkim-atps=neutral``. Unsigned mail gets no header unless ``AlwaysAddARHeader
yes``. The final milter reply is SMFIR_ACCEPT after signing or verifying (On-BadSignature and
On-KeyNotFound default to accept; On-DNSError and On-InternalError to tempfail). In mode "sv" a
message that gets signed is not verified; one from an internal host whose From: domain is not in
the SigningTable is verified; in mode "v" everything is verified, internal or not.

Process, sockets, logs
======================
Runs ``opendkim -f -x WORKDIR/opendkim.conf`` (foreground, no fork, so `pid` is OpenDKIM itself;
stop() sends SIGTERM and then connects to the socket, because libmilter only checks for the stop
request when its listener's poll() returns, which otherwise takes about 5 s),
as root by default, or as `user` (e.g. "opendkim", via ``UserID``). Everything OpenDKIM must
open after start is put in a private runtime directory under /tmp (mode 0755, linked from
WORKDIR/run, removed by stop()): the key files (copied, owned by the user, 0600;
``RequireSafeKeys no`` because /tmp is world-writable), the milter socket and the log socket.
The default socket is ``unix:RUNDIR/opendkim.sock``, created with ``UMask 0111`` (mode 0666) so
Postfix's smtpd (user postfix) can reach it; `socket` may instead be ``inet:PORT@127.0.0.1``
(or "inet" for a free port). `socket` is libmilter syntax, `postfix_socket` Postfix syntax.
OpenDKIM logs only through syslog(3) (/dev/log); it has no log-file option, and this container
has no /dev/log. When running as root with util-linux `unshare`, the harness starts OpenDKIM in a
private mount namespace whose /dev is a small tmpfs (null, zero, full, random, urandom bound from
the real /dev) with /dev/log -> RUNDIR/log.sock, where a thread of this process receives the
datagrams and appends them to WORKDIR/opendkim.log (``Syslog yes``, ``SyslogSuccess``,
``LogWhy`` and ``LogResults`` on unless `log=False`). The system's /dev is untouched. Without
that, ``Syslog no``. Startup errors (bad configuration) go to WORKDIR/opendkim.stderr.

Offline tools
=============
``OpenDKIM.test_mode(message)`` runs ``opendkim -t FILE -vv`` with this instance's configuration
and no daemon: the message is treated as coming from 127.0.0.1, so it is signed when the
instance signs (InternalHosts) and verified otherwise (use mode "v"); it returns the headers
OpenDKIM would add, with DNS going to the devdns server. ``sign_with_opendkim_testmsg`` wraps
opendkim-testmsg(8), which is much more limited in this version: it signs only with rsa-sha1
and c=relaxed/simple (no options), needs ``-C`` to emit a usable CRLF signature (without it the
unfolded b= value comes out corrupted), cannot use an Ed25519 key ("dkim_eom(): Resource
unavailable"), rejects some minimal messages ("dkim_chunk(): Syntax error", e.g. From+Subject
only), and verifies only through the system resolver (/etc/resolv.conf, port 53), printing
nothing but an exit status. Prefer test_mode().
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket as socketlib
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

OPENDKIM = "/usr/sbin/opendkim"
OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"
START_TIMEOUT = 15.0
DEV_NODES = ("null", "zero", "full", "random", "urandom")

__all__ = [
    "OpenDKIM",
    "TestModeResult",
    "dkim_txt_record",
    "key_algorithm",
    "opendkim_available",
    "opendkim_version",
    "sign_with_opendkim_testmsg",
]


def opendkim_available() -> bool:
    """True if Debian's opendkim daemon is installed (package 'opendkim')."""
    return os.access(OPENDKIM, os.X_OK)


@cache
def opendkim_version() -> str:
    """``opendkim -V`` output (version, algorithms, build options)."""
    done = subprocess.run([OPENDKIM, "-V"], capture_output=True, text=True, timeout=10,
                          check=False)
    return done.stdout + done.stderr


def key_algorithm(pem: bytes) -> str:
    """"rsa-sha256" or "ed25519-sha256" for a private key in PEM form."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa-sha256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519-sha256"
    raise ValueError(f"unsupported DKIM key type {type(key).__name__}")


def dkim_txt_record(private_pem: bytes) -> str:
    """The DNS TXT value publishing the public half of a PEM private key (RSA or Ed25519)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    raise ValueError(f"unsupported DKIM key type {type(key).__name__}")


def _namespace_argv(run_dir: Path, argv: list[str]) -> list[str]:
    """`argv` in a private mount namespace whose /dev is a small tmpfs with the usual character
    devices bound from the real /dev and /dev/log -> RUN_DIR/log.sock."""
    newdev = run_dir / "dev"
    newdev.mkdir(exist_ok=True)
    q = shlex.quote
    script = [f"mount -t tmpfs -o mode=755,size=64k opendkim-dev {q(str(newdev))}"]
    for node in DEV_NODES:
        target = q(str(newdev / node))
        script.append(f"touch {target} && mount --bind /dev/{node} {target}")
    script += [
        f"ln -s /proc/self/fd {q(str(newdev / 'fd'))}",
        f"ln -s {q(str(run_dir / 'log.sock'))} {q(str(newdev / 'log'))}",
        f"mount --move {q(str(newdev))} /dev",
        "exec " + " ".join(q(a) for a in argv),
    ]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(script)]


@cache
def _can_capture_syslog() -> bool:
    """Whether _namespace_argv works here (root, util-linux unshare, mounts allowed): tried once
    with `true` in a scratch directory."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="opendkim-probe-") as tmp:
        try:
            done = subprocess.run(_namespace_argv(Path(tmp), ["true"]), capture_output=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def _free_port(host: str = "127.0.0.1") -> int:
    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _unix_listening(path: str) -> bool:
    """Whether a UNIX stream socket is listening at `path` (from /proc/net/unix, no probe
    connection: OpenDKIM would log a connection that says nothing)."""
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return os.path.exists(path)
    for line in table.splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON
        if len(fields) >= 8 and fields[-1] == path and int(fields[3], 16) & 0x10000:
            return True
    return False


def _tcp_listening(host: str, port: int) -> bool:
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return False
    addr = "{:08X}".format(struct.unpack("=I", socketlib.inet_aton(host))[0])
    wanted = {f"{addr}:{port:04X}", f"00000000:{port:04X}"}
    return any(
        len(f) > 3 and f[1] in wanted and f[3] == "0A"
        for f in (line.split() for line in table.splitlines()[1:])
    )


class _SyslogReceiver:
    """Receives syslog datagrams on a UNIX socket and appends them to a file."""

    def __init__(self, sock_path: Path, log_path: Path) -> None:
        self.sock_path = sock_path
        self.log_path = log_path
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self._sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
        self._sock.bind(str(sock_path))
        sock_path.chmod(0o666)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opendkim-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.log_path.open("ab", buffering=0) as out:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                # "<PRI>Mmm dd hh:mm:ss opendkim[PID]: text" -> drop the <PRI>
                out.write(re.sub(rb"^<\d+>", b"", data.rstrip(b"\n\0")) + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        with contextlib.suppress(OSError):
            self.sock_path.unlink()


@dataclass
class TestModeResult:
    """What ``opendkim -t`` did with one message."""

    returncode: int
    headers: list[tuple[str, str]]  # added or inserted header fields, in order
    output: str  # everything opendkim printed

    @property
    def signatures(self) -> list[str]:
        return [v for n, v in self.headers if n.lower() == "dkim-signature"]

    @property
    def auth_results(self) -> list[str]:
        return [v for n, v in self.headers if n.lower() == "authentication-results"]


class MilterProcess:
    """What the OpenDKIM and OpenDMARC harnesses share: their process, socket and log."""

    _proc: subprocess.Popen[bytes] | None
    socket: str
    log_path: Path

    @property
    def pid(self) -> int | None:
        """The milter's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def postfix_socket(self) -> str:
        """`socket` in Postfix's smtpd_milters syntax (unix:/path or inet:host:port)."""
        if self.socket.startswith("inet:"):
            port, _, host = self.socket[5:].partition("@")
            return f"inet:{host or '127.0.0.1'}:{port}"
        return self.socket

    def is_running(self) -> bool:
        return self.pid is not None

    def log_text(self) -> str:
        """The milter's syslog lines so far (empty when they are not captured)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> list[str]:
        """Log lines matching the regex `pattern`, waiting up to `timeout` for the first."""
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.log_text().splitlines() if re.search(pattern, ln)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


class OpenDKIM(MilterProcess):
    """A private OpenDKIM milter process; see the module docstring.

    mode: "s", "v" or "sv". keys: (domain, selector, private key PEM path), all RSA or all
    Ed25519. dns: (host, port) of the DNS server for key lookups (``Nameservers host@port``).
    socket: None (a UNIX socket in the runtime dir), "inet" (a free port on 127.0.0.1), or a
    libmilter spec ("unix:/p", "inet:PORT@127.0.0.1"). extra_conf: opendkim.conf lines that
    override or add to the generated ones (a value of "" drops a generated line). user: run as
    that user (``UserID``). log: capture OpenDKIM's syslog into WORKDIR/opendkim.log if possible
    (turn it off for benchmarks).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mode: str,
        keys: Sequence[tuple[str, str, Path]] = (),
        dns: tuple[str, int],
        canonicalization: str = "relaxed/relaxed",
        socket: str | None = None,
        internal_hosts: Iterable[str] = ("127.0.0.0/8",),
        extra_conf: dict[str, str] | None = None,
        user: str | None = None,
        log: bool = True,
        oversign_headers: Sequence[str] = ("From",),
    ) -> None:
        if not mode or set(mode) - {"s", "v"}:
            raise ValueError(f"mode must be 's', 'v' or 'sv', not {mode!r}")
        self.workdir = Path(workdir).absolute()
        self.mode = mode
        self.keys = [(d, s, Path(p)) for d, s, p in keys]
        self.dns = dns
        self.canonicalization = canonicalization
        self.internal_hosts = list(internal_hosts)
        self.extra_conf = dict(extra_conf or {})
        self.user = user
        self.log = log
        self.oversign_headers = list(oversign_headers)
        self._socket_request = socket
        self.socket = ""  # known after start() (or _prepare())
        self.conf_path = self.workdir / "opendkim.conf"
        self.log_path = self.workdir / "opendkim.log"
        self.stderr_path = self.workdir / "opendkim.stderr"
        self.run_dir: Path | None = None
        self.signature_algorithm = self._signature_algorithm()
        self._proc: subprocess.Popen[bytes] | None = None
        self._syslog: _SyslogReceiver | None = None
        if "s" in mode and not self.keys:
            raise ValueError("mode 's' needs at least one key")

    # ---- properties ----------------------------------------------------------------------------

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start OpenDKIM in the foreground, wait for its socket."""
        if self._proc is not None:
            raise RuntimeError("this OpenDKIM is already started")
        if not opendkim_available():
            raise RuntimeError(f"{OPENDKIM} is missing (apt-get install opendkim)")
        atexit.register(self.stop)
        try:
            self._prepare()
            capture = self.log and _can_capture_syslog()
            self._write_conf(syslog=capture)
            argv = [OPENDKIM, "-f", "-x", str(self.conf_path)]
            if capture:
                assert self.run_dir is not None
                self._syslog = _SyslogReceiver(self.run_dir / "log.sock", self.log_path)
                argv = _namespace_argv(self.run_dir, argv)
            with self.stderr_path.open("ab") as err:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                              stderr=err, start_new_session=True)
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop OpenDKIM (SIGTERM, then SIGKILL after 5 s), the log thread, the runtime dir."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                # libmilter notices the stop request only when its listener's poll() returns,
                # which takes up to ~5 s when idle: a connection wakes it at once
                deadline = time.monotonic() + 5
                while proc.poll() is None and time.monotonic() < deadline:
                    self._poke()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.1)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        finally:
            if self._syslog is not None:
                self._syslog.close()
                self._syslog = None
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
            atexit.unregister(self.stop)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> OpenDKIM:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- offline test mode ---------------------------------------------------------------------

    def test_mode(self, message: bytes, timeout: float = 30.0) -> TestModeResult:
        """Run ``opendkim -t`` on `message` with this configuration (no daemon needed): the
        message counts as coming from 127.0.0.1. Returns the header fields it would add."""
        own_dir = self.run_dir is None
        self._prepare(choose_socket=False)
        assert self.run_dir is not None
        try:
            conf = self.workdir / "opendkim-test.conf"
            self._write_conf(syslog=False, path=conf, with_socket=False)
            msg_path = self.run_dir / "test-message.eml"
            msg_path.write_bytes(message.replace(b"\r\n", b"\n"))
            done = subprocess.run([OPENDKIM, "-x", str(conf), "-t", str(msg_path), "-vv"],
                                  capture_output=True, timeout=timeout, check=False)
        finally:
            if own_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
        output = (done.stdout + done.stderr).decode(errors="replace")
        return TestModeResult(done.returncode, _parse_test_headers(output), output)

    # ---- internals -----------------------------------------------------------------------------

    def _signature_algorithm(self) -> str | None:
        if "SignatureAlgorithm" in self.extra_conf:
            return self.extra_conf["SignatureAlgorithm"]
        algorithms = {key_algorithm(path.read_bytes()) for _, _, path in self.keys}
        if len(algorithms) > 1:
            raise ValueError(
                "OpenDKIM 2.11 signs with one SignatureAlgorithm per process and cannot mix "
                f"{' and '.join(sorted(algorithms))} keys: run one OpenDKIM per key type"
            )
        return algorithms.pop() if algorithms else None

    def _prepare(self, choose_socket: bool = True) -> None:
        """Make WORKDIR and the private runtime dir; copy the keys; choose the socket."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.run_dir is None or not self.run_dir.is_dir():
            self.run_dir = Path(tempfile.mkdtemp(prefix="opendkim-harness-", dir="/tmp"))
            self.run_dir.chmod(0o755)
            link = self.workdir / "run"
            with contextlib.suppress(OSError):
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(self.run_dir)
        owner: tuple[int, int] | None = None  # None: keep ours (root, or a non-root caller)
        if self.user is not None:
            entry = pwd.getpwnam(self.user.partition(":")[0])
            owner = (entry.pw_uid, entry.pw_gid)
        keydir = self.run_dir / "keys"
        keydir.mkdir(exist_ok=True)
        keydir.chmod(0o755)
        for index, (_, _, path) in enumerate(self.keys):
            copy = keydir / f"key{index}.pem"
            shutil.copyfile(path, copy)
            copy.chmod(0o600)
            if owner is not None:
                os.chown(copy, *owner)
        request = self._socket_request
        if not choose_socket:
            pass
        elif request is None:
            self.socket = f"unix:{self.run_dir / 'opendkim.sock'}"
        elif request == "inet":
            self.socket = f"inet:{_free_port()}@127.0.0.1"
        else:
            self.socket = request

    def _conf_socket(self) -> str:
        if self.socket.startswith("unix:"):
            return "local:" + self.socket[5:]
        return self.socket

    def _write_conf(self, *, syslog: bool, path: Path | None = None,
                    with_socket: bool = True) -> None:
        assert self.run_dir is not None
        w = self.workdir
        keytable = w / "KeyTable"
        signingtable = w / "SigningTable"
        internal = w / "InternalHosts"
        keytable.write_text("".join(
            f"key{i} {domain}:{selector}:{self.run_dir / 'keys' / f'key{i}.pem'}\n"
            for i, (domain, selector, _) in enumerate(self.keys)))
        signingtable.write_text("".join(
            f"*@{domain} key{i}\n" for i, (domain, _, _) in enumerate(self.keys)))
        internal.write_text("".join(f"{host}\n" for host in self.internal_hosts))
        host, port = self.dns
        conf: dict[str, str] = {
            "Mode": self.mode,
            "Canonicalization": self.canonicalization,
            "Nameservers": f"{host}@{port}",
            "DNSTimeout": "5",
            "InternalHosts": f"refile:{internal}",
            "ExternalIgnoreList": f"refile:{internal}",
            "RequireSafeKeys": "no",
            "UMask": "0111",
            "Background": "no",
            "Syslog": "yes" if syslog else "no",
            "SyslogSuccess": "yes" if syslog else "no",
            "LogWhy": "yes" if syslog else "no",
            "LogResults": "yes" if syslog else "no",
            "SoftwareHeader": "no",
        }
        if with_socket:
            conf["Socket"] = self._conf_socket()
        if self.keys:
            conf["KeyTable"] = f"file:{keytable}"
            conf["SigningTable"] = f"refile:{signingtable}"
            conf["MultipleSignatures"] = "yes"
        if self.signature_algorithm:
            conf["SignatureAlgorithm"] = self.signature_algorithm
        if self.oversign_headers:
            conf["OversignHeaders"] = ",".join(self.oversign_headers)
        if self.user is not None:
            conf["UserID"] = self.user
        conf.update(self.extra_conf)
        text = "".join(f"{key} {value}\n" for key, value in conf.items() if value != "")
        (path or self.conf_path).write_text(text)

    def _poke(self) -> None:
        """Connect to the milter socket and hang up at once (wakes libmilter's listener)."""
        try:
            if self.socket.startswith(("unix:", "local:", "/")):
                with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
                    sock.settimeout(0.5)
                    sock.connect(self.socket.partition(":")[2] if ":" in self.socket
                                 else self.socket)
            else:
                port, _, host = self.socket.partition(":")[2].partition("@")
                with socketlib.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
                    pass
        except (OSError, ValueError):
            pass

    def _listening(self) -> bool:
        if self.socket.startswith(("unix:", "local:")):
            return _unix_listening(self.socket.partition(":")[2])
        if self.socket.startswith("/"):
            return _unix_listening(self.socket)
        port, _, host = self.socket.partition(":")[2].partition("@")
        return _tcp_listening(host or "127.0.0.1", int(port))

    def _wait_until_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"OpenDKIM did not listen on {self.socket} within {START_TIMEOUT} s "
                    f"(exit status {code})\n{self.diagnostics()}")
            time.sleep(0.02)
        try:
            exe = os.readlink(f"/proc/{self._proc.pid}/exe")
        except OSError:
            exe = OPENDKIM
        if os.path.realpath(exe) != os.path.realpath(OPENDKIM):
            raise RuntimeError(f"pid {self._proc.pid} runs {exe}, not {OPENDKIM}")

    def diagnostics(self) -> str:
        def tail(path: Path) -> str:
            try:
                return "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            except OSError:
                return ""

        return (f"--- {self.conf_path}:\n{tail(self.conf_path)}\n"
                f"--- {self.stderr_path}:\n{tail(self.stderr_path)}\n"
                f"--- {self.log_path}:\n{tail(self.log_path)}")


def _parse_test_headers(output: str) -> list[tuple[str, str]]:
    """Header fields from ``opendkim -t -vv`` lines such as
    ``### INSHEADER: idx=0 hname='DKIM-Signature' hvalue='v=1; ...'`` (values may span lines)."""
    pattern = re.compile(
        r"^### (?:INSHEADER|ADDHEADER): (?:idx=\d+ )?hname='([^']*)' hvalue='(.*?)'\s*$"
        r"(?=\n###|\nopendkim:|\n*\Z)",
        re.MULTILINE | re.DOTALL,
    )
    return [(m.group(1), m.group(2)) for m in pattern.finditer(output)]


def sign_with_opendkim_testmsg(message: bytes, *, domain: str, selector: str, key_path: Path,
                               timeout: float = 30.0) -> bytes:
    """Sign `message` with opendkim-testmsg(8): rsa-sha1, c=relaxed/simple, RSA keys only (the
    tool has no options for algorithm or canonicalization). Returns the signed message with
    CRLF line ends; raises RuntimeError with its complaint otherwise (see the module docstring).
    """
    if not os.access(OPENDKIM_TESTMSG, os.X_OK):
        raise RuntimeError(f"{OPENDKIM_TESTMSG} is missing (apt-get install opendkim-tools)")
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    with tempfile.TemporaryDirectory(prefix="opendkim-testmsg-") as tmp:
        done = subprocess.run(
            [OPENDKIM_TESTMSG, "-C", "-d", domain, "-s", selector, "-k", str(key_path),
             "-t", tmp],
            input=data, capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"opendkim-testmsg failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout
