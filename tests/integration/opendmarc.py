"""Debian's OpenDMARC (/usr/sbin/opendmarc) as a milter, resolving from a loopback DNS server.

    host = loopback_dns_host()                   # e.g. "127.53.17.201", port 53 free there
    with DevDNSServer(zone, host=host, port=53) as dns, OpenDMARC(
            tmp_path / "odm", dns=(host, 53), authserv_id="mx.test.example") as odm:
        with MilterClient(odm.socket) as client:        # benchmarks/milterload.py
            result = client.send_message(client_ip="192.0.2.1", ...)

Checked against Debian bookworm's opendmarc 1.4.2-2+b1 (libopendmarc2 1.4.2, libmilter 1.0.1,
"Active code options: WITH_SPF WITH_SPF2", i.e. SPF through libspf2).

What it does here
=================
OpenDMARC does no DKIM itself: it reads the ``Authentication-Results`` fields of upstream filters
whose authserv-id is in ``TrustedAuthservIDs`` (here OpenDKIM's, e.g. ``mx.test.example;
dkim=pass header.d=...``). With ``SPFSelfValidate true`` and ``SPFIgnoreResults true`` it always
evaluates SPF itself (MAIL FROM domain, HELO for the null sender) through libspf2, so a chain
OpenDKIM -> OpenDMARC does SPF, DKIM and DMARC like mailwarden. For each message it inserts (at
index 0, SMFIR_INSHEADER) first ``AUTHSERV; spf=pass smtp.mailfrom=DOMAIN`` and then
``AUTHSERV; dmarc=pass (p=reject dis=none) header.from=DOMAIN``, so the DMARC field ends on top.
With ``RejectFailures true`` a failing message under p=reject gets ``550 5.7.1 rejected by DMARC
policy for DOMAIN`` (only the spf= field is inserted then); otherwise it is accepted with
``dmarc=fail``. Mail from ``IgnoreHosts`` (default: 127.0.0.1 only) is not looked at: use
another client address, or pass `ignore_hosts`. No ``HistoryFile`` (no aggregate-report data)
and no failure reports are configured. The Public Suffix List is Debian's
(/usr/share/publicsuffix/public_suffix_list.dat, package publicsuffix, a dependency).

DNS: only /etc/resolv.conf, only port 53
========================================
OpenDMARC 1.4.2 has no nameserver setting. libopendmarc looks up ``_dmarc`` records with
res_ninit()/res_nquery() and libspf2 does its SPF lookups with res_ninit()/res_nquery() too:
both read /etc/resolv.conf, whose ``nameserver`` lines take an address but no port (glibc
always asks port 53). (``DNSTimeout`` is "ignored if not using an asynchronous resolver
package"; the undocumented ``TestDNSData`` file only feeds fake records to libopendmarc, not to
libspf2.) The loopback DNS server must therefore answer on port 53, and OpenDMARC must see a
resolv.conf pointing at it, without touching the machine's resolver:

* the DNS server listens on port 53 of a loopback address of its own, picked at random in
  127.53.0.0/16 by ``loopback_dns_host()`` (all of 127.0.0.0/8 is local on Linux; nothing else
  listens on that address, so nothing is taken over, and 127.0.0.1:53 stays free);
* OpenDMARC runs in a private mount namespace (``unshare --mount --propagation private``) in
  which a generated resolv.conf (``nameserver HOST`` and short timeouts) is bind-mounted over
  /etc/resolv.conf. Only that process sees it: the system file and every other process are
  untouched, and the mount disappears with the process.

This needs root and util-linux ``unshare``/``mount`` (``namespace_problem()`` says why not, for
skips). Alternatives rejected: editing /etc/resolv.conf (affects the whole machine); a private
network namespace with its own 127.0.0.1:53 (the DNS server, mailwarden and OpenDKIM live in the
host's namespace, so it would need a relay process in the DNS path of OpenDMARC alone, which
would distort the comparison); an LD_PRELOAD shim rewriting the resolver's port (fragile).
mailwarden (``nameservers: [HOST:53]``) and OpenDKIM (``Nameservers HOST@53``) can be pointed at
the same server, so all three resolve from one server. Note that OpenDMARC through libresolv
caches nothing: every message costs its DNS queries (``_dmarc.DOMAIN`` TXT and the SPF TXT).

Process and logs
================
Runs ``opendmarc -f -c WORKDIR/opendmarc.conf`` (foreground; ``unshare`` and ``sh`` exec it, so
`pid` is OpenDMARC itself), as root unless `user` is given (``UserID``). The socket, resolv.conf
and the syslog socket live in a private runtime directory under /tmp (mode 0755, linked from
WORKDIR/run, removed by stop()); the default socket is ``unix:RUNDIR/opendmarc.sock`` with
``UMask 0111`` so Postfix could reach it. OpenDMARC logs only through syslog(3); with `log` the
same namespace also gets a small tmpfs /dev whose /dev/log is a socket read by a thread of this
process (as tests/integration/opendkim.py does), appended to WORKDIR/opendmarc.log. Start-up
errors go to WORKDIR/opendmarc.stderr. stop() sends SIGTERM and pokes the socket (libmilter
notices the request only when its listener's poll() returns).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import random
import shlex
import shutil
import signal
import socket as socketlib
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from types import TracebackType

from opendkim import (
    DEV_NODES,
    MilterProcess,
    _SyslogReceiver,
    _tcp_listening,
    _unix_listening,
)

OPENDMARC = "/usr/sbin/opendmarc"
PUBLIC_SUFFIX_LIST = Path("/usr/share/publicsuffix/public_suffix_list.dat")
START_TIMEOUT = 15.0

__all__ = [
    "OpenDMARC",
    "loopback_dns_host",
    "namespace_problem",
    "opendmarc_available",
    "opendmarc_version",
]


def opendmarc_available() -> bool:
    """True if Debian's opendmarc daemon is installed (package 'opendmarc')."""
    return os.access(OPENDMARC, os.X_OK)


@cache
def opendmarc_version() -> str:
    """``opendmarc -V`` output (version and build options)."""
    done = subprocess.run([OPENDMARC, "-V"], capture_output=True, text=True, timeout=10,
                          check=False)
    return done.stdout + done.stderr


def _port53_free(host: str) -> bool:
    """Whether UDP and TCP port 53 can both be bound on `host` right now."""
    family = socketlib.AF_INET6 if ":" in host else socketlib.AF_INET
    socks: list[socketlib.socket] = []
    try:
        for kind in (socketlib.SOCK_DGRAM, socketlib.SOCK_STREAM):
            sock = socketlib.socket(family, kind)
            socks.append(sock)
            sock.bind((host, 53))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def loopback_dns_host(attempts: int = 20) -> str:
    """A random address in 127.53.0.0/16 on which port 53 (UDP and TCP) is free, for a loopback
    DNS server that OpenDMARC can use (see the module docstring). Needs root (port 53)."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        host = f"127.53.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if _port53_free(host):
            return host
    raise RuntimeError("no address in 127.53.0.0/16 with port 53 free (root is needed to bind "
                       "port 53)")


def _namespace_script(resolv_conf: Path, argv: Sequence[str], dev_dir: Path | None,
                      log_socket: Path | None) -> list[str]:
    """`argv` in a private mount namespace where `resolv_conf` is mounted over /etc/resolv.conf
    and, with `dev_dir`, /dev is a small tmpfs whose /dev/log is `log_socket`."""
    q = shlex.quote
    target = os.path.realpath("/etc/resolv.conf")
    lines = [f"mount --bind {q(str(resolv_conf))} {q(target)}"]
    if dev_dir is not None and log_socket is not None:
        dev_dir.mkdir(exist_ok=True)
        lines.append(f"mount -t tmpfs -o mode=755,size=64k opendmarc-dev {q(str(dev_dir))}")
        for node in DEV_NODES:
            lines.append(f"touch {q(str(dev_dir / node))} && "
                         f"mount --bind /dev/{node} {q(str(dev_dir / node))}")
        lines += [f"ln -s /proc/self/fd {q(str(dev_dir / 'fd'))}",
                  f"ln -s {q(str(log_socket))} {q(str(dev_dir / 'log'))}",
                  f"mount --move {q(str(dev_dir))} /dev"]
    lines.append("exec " + " ".join(q(a) for a in argv))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(lines)]


@cache
def namespace_problem() -> str | None:
    """Why OpenDMARC cannot be given a private resolv.conf here, or None if it can (root,
    util-linux unshare and mount, mounts allowed: tried once with a scratch file and `cat`)."""
    if os.geteuid() != 0:
        return "a private resolv.conf for OpenDMARC needs root (unshare --mount)"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool}(1) (util-linux) is missing"
    with tempfile.TemporaryDirectory(prefix="opendmarc-probe-") as tmp:
        probe = Path(tmp) / "resolv.conf"
        probe.write_text("# opendmarc harness probe\n")
        try:
            done = subprocess.run(_namespace_script(probe, ["cat", "/etc/resolv.conf"], None,
                                                    None),
                                  capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unshare --mount failed: {exc}"
    if done.returncode != 0 or "opendmarc harness probe" not in done.stdout:
        return f"unshare --mount + bind mount did not work: {done.stderr.strip()[:200]}"
    return None


class OpenDMARC(MilterProcess):
    """A private OpenDMARC milter process; see the module docstring.

    dns: (address, 53) of the DNS server (the port must be 53). authserv_id: ours in the
    Authentication-Results it writes. trusted_authserv_ids: whose Authentication-Results it
    believes (default: authserv_id, i.e. an OpenDKIM configured with the same AuthservID).
    spf: evaluate SPF itself (SPFSelfValidate + SPFIgnoreResults). reject_failures: refuse
    p=reject failures (RejectFailures). ignore_hosts: IgnoreHosts entries (default: OpenDMARC's
    own, 127.0.0.1). socket: None (a UNIX socket in the runtime dir), "inet" (a free port on
    127.0.0.1) or a libmilter spec. extra_conf: opendmarc.conf lines overriding or adding to the
    generated ones ("" drops one). log: capture syslog into WORKDIR/opendmarc.log (turn it off
    for benchmarks).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dns: tuple[str, int],
        authserv_id: str = "mx.test.example",
        trusted_authserv_ids: Iterable[str] | None = None,
        spf: bool = True,
        reject_failures: bool = False,
        ignore_hosts: Iterable[str] | None = None,
        socket: str | None = None,
        extra_conf: dict[str, str] | None = None,
        user: str | None = None,
        log: bool = True,
    ) -> None:
        host, port = dns
        if port != 53:
            raise ValueError(
                f"OpenDMARC resolves only through /etc/resolv.conf, i.e. port 53: run the DNS "
                f"server on port 53 of a loopback address (loopback_dns_host()), not port {port}")
        ipaddress.ip_address(host)  # resolv.conf takes addresses only
        self.workdir = Path(workdir).absolute()
        self.dns = (host, port)
        self.authserv_id = authserv_id
        self.trusted_authserv_ids = list(trusted_authserv_ids or [authserv_id])
        self.spf = spf
        self.reject_failures = reject_failures
        self.ignore_hosts = None if ignore_hosts is None else list(ignore_hosts)
        self.extra_conf = dict(extra_conf or {})
        self.user = user
        self.log = log
        self._socket_request = socket
        self.socket = ""  # known after start()
        self.conf_path = self.workdir / "opendmarc.conf"
        self.log_path = self.workdir / "opendmarc.log"
        self.stderr_path = self.workdir / "opendmarc.stderr"
        self.run_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._syslog: _SyslogReceiver | None = None

    # ---- properties ----------------------------------------------------------------------------

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start OpenDMARC in its mount namespace, wait for the socket."""
        if self._proc is not None:
            raise RuntimeError("this OpenDMARC is already started")
        if not opendmarc_available():
            raise RuntimeError(f"{OPENDMARC} is missing (apt-get install opendmarc)")
        problem = namespace_problem()
        if problem is not None:
            raise RuntimeError(f"cannot point OpenDMARC at the loopback DNS server: {problem}")
        atexit.register(self.stop)
        try:
            self._prepare()
            assert self.run_dir is not None
            self._write_conf(syslog=self.log)
            argv = [OPENDMARC, "-f", "-c", str(self.conf_path)]
            dev_dir = log_socket = None
            if self.log:
                log_socket = self.run_dir / "log.sock"
                dev_dir = self.run_dir / "dev"
                self._syslog = _SyslogReceiver(log_socket, self.log_path)
            argv = _namespace_script(self.run_dir / "resolv.conf", argv, dev_dir, log_socket)
            with self.stderr_path.open("ab") as err:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                              stderr=err, start_new_session=True)
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop OpenDMARC (SIGTERM, then SIGKILL after 5 s), the log thread, the runtime dir."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
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

    def __enter__(self) -> OpenDMARC:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- internals -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="opendmarc-harness-", dir="/tmp"))
        self.run_dir.chmod(0o755)
        link = self.workdir / "run"
        with contextlib.suppress(OSError):
            if link.is_symlink():
                link.unlink()
            link.symlink_to(self.run_dir)
        (self.run_dir / "resolv.conf").write_text(
            f"# private to this OpenDMARC (opendmarc.py harness)\n"
            f"nameserver {self.dns[0]}\noptions timeout:2 attempts:2\n")
        request = self._socket_request
        if request is None:
            self.socket = f"unix:{self.run_dir / 'opendmarc.sock'}"
        elif request == "inet":
            with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                self.socket = f"inet:{probe.getsockname()[1]}@127.0.0.1"
        else:
            self.socket = request

    def _write_conf(self, *, syslog: bool) -> None:
        socket = self.socket
        if socket.startswith("unix:"):
            socket = "local:" + socket[5:]
        conf: dict[str, str] = {
            "Socket": socket,
            "Background": "false",
            "AuthservID": self.authserv_id,
            "TrustedAuthservIDs": ",".join(self.trusted_authserv_ids),
            "SPFSelfValidate": "true" if self.spf else "false",
            "SPFIgnoreResults": "true" if self.spf else "false",
            "RejectFailures": "true" if self.reject_failures else "false",
            "FailureReports": "false",
            "SoftwareHeader": "false",
            "UMask": "0111",
            "Syslog": "true" if syslog else "false",
        }
        if PUBLIC_SUFFIX_LIST.exists():
            conf["PublicSuffixList"] = str(PUBLIC_SUFFIX_LIST)
        if self.ignore_hosts is not None:
            hosts = self.workdir / "IgnoreHosts"
            hosts.write_text("".join(f"{h}\n" for h in self.ignore_hosts))
            conf["IgnoreHosts"] = str(hosts)
        if self.user is not None:
            conf["UserID"] = self.user
        conf.update(self.extra_conf)
        self.conf_path.write_text("".join(f"{k} {v}\n" for k, v in conf.items() if v != ""))

    def _poke(self) -> None:
        """Connect to the milter socket and hang up (wakes libmilter's listener)."""
        try:
            if self.socket.startswith("unix:"):
                with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
                    sock.settimeout(0.5)
                    sock.connect(self.socket[5:])
            else:
                port, _, host = self.socket.partition(":")[2].partition("@")
                with socketlib.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
                    pass
        except (OSError, ValueError):
            pass

    def _listening(self) -> bool:
        kind, _, rest = self.socket.partition(":")
        if kind in ("unix", "local"):
            return _unix_listening(rest)
        port, _, host = rest.partition("@")
        return _tcp_listening(host or "127.0.0.1", int(port))

    def _wait_until_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"OpenDMARC did not listen on {self.socket} within {START_TIMEOUT} s "
                    f"(exit status {code})\n{self.diagnostics()}")
            time.sleep(0.02)
        try:
            exe = os.readlink(f"/proc/{self._proc.pid}/exe")
        except OSError:
            exe = OPENDMARC
        if os.path.realpath(exe) != os.path.realpath(OPENDMARC):
            raise RuntimeError(f"pid {self._proc.pid} runs {exe}, not {OPENDMARC}")

    def diagnostics(self) -> str:
        def tail(path: Path) -> str:
            try:
                return "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            except OSError:
                return ""

        return (f"--- {self.conf_path}:\n{tail(self.conf_path)}\n"
                f"--- {self.stderr_path}:\n{tail(self.stderr_path)}\n"
                f"--- {self.log_path}:\n{tail(self.log_path)}")
