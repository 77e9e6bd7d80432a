"""A real, private Postfix instance on loopback, for end-to-end milter tests.

    with PostfixInstance(tmp_path / "postfix", milter="inet:127.0.0.1:8894") as mx:
        with smtplib.SMTP("127.0.0.1", mx.smtp_port, source_address=("127.0.0.5", 0)) as smtp:
            smtp.sendmail(...)
        [message] = mx.wait_for_messages(1)

The mail path is: SMTP client --> Postfix smtpd on 127.0.0.1:`smtp_port` (the milter attached)
--> Postfix smtp client --> `smtpsink.py` (a stdlib asyncio SMTP sink, a subprocess) on another
loopback port, which stores every message it receives, byte for byte, under WORKDIR/sink.
Postfix accepts mail for any domain from any client and relays all of it to the sink: the milter
is the only judge.

Everything lives under WORKDIR: conf/ (main.cf, master.cf; use `postfix -c WORKDIR/conf ...`),
queue/ (queue_directory), data/ (data_directory), maillog (Postfix's log, written by postlogd),
sink/ (NNNNNNNN.eml and its envelope NNNNNNNN.json), sink.log and postfix-commands.log.

Permissions: Postfix's master opens data_directory/master.lock as the `postfix` user, so that
user must be able to search every directory above data_directory. pytest's tmp_path is not
(/tmp/pytest-of-root is 0700); then data_directory (and `socket_dir`) go to a private directory
made under /tmp, linked from WORKDIR/data and WORKDIR/sockets, and removed when the instance is
garbage-collected or at exit. Everything else Postfix opens by absolute path as root, or after
a chdir to queue_directory made as root, so it stays under WORKDIR. A milter listening on a UNIX
socket must put it where the `postfix` user can reach and write it: `socket_dir` is such a
directory (known before start(); `milter` is read at start()), and the socket itself must be
writable by `postfix` (chmod 0666 or chown postfix). An inet: milter needs none of this.

start() makes sure smtpd greets: it connects once from 127.0.0.254 (PROBE_ADDR), for which
smtpd_milter_maps turns the milters off, so the milter never sees that probe; the maillog shows
its connect/disconnect lines. XCLIENT is allowed from 127.0.0.0/8, so a test can present any
client address (e.g. 192.0.2.1) to Postfix and the milter.

Requires root (postfix(1) is "reserved for the superuser") and Debian's `postfix` package, which
may be installed unconfigured ("No configuration": no /etc/postfix/main.cf); the system's
/etc/postfix and /usr/share/postfix are only read (postfix-files, master.cf.dist), and
/var/spool/postfix and /var/lib/postfix are not touched.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
SINK_SCRIPT = Path(__file__).with_name("smtpsink.py")
MASTER_CF_SOURCES = (
    Path("/usr/share/postfix/master.cf.dist"),  # Debian's pristine copy
    Path("/etc/postfix/master.cf.proto"),
    Path("/etc/postfix/master.cf"),
)
MILTER_MACRO_PARAMETERS = (
    "milter_connect_macros", "milter_helo_macros", "milter_mail_macros", "milter_rcpt_macros",
    "milter_data_macros", "milter_end_of_header_macros", "milter_end_of_data_macros",
    "milter_unknown_command_macros",
)
START_TIMEOUT = 20.0
MYHOSTNAME = "mx.test.example"
QUEUE_ID = r"[0-9A-Za-z]{6,}"
PROBE_ADDR = "127.0.0.254"  # start() checks smtpd from here; smtpd_milter_maps disables milters


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def postfix_available() -> bool:
    """True if the `postfix` and `postconf` commands are installed."""
    return _which("postfix") is not None and _which("postconf") is not None


def _env() -> dict[str, str]:
    """The environment for Postfix commands: no inherited MAIL_CONFIG & co, sbin on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "POSTLOG_"))}
    env["PATH"] = env.get("PATH", "") + os.pathsep + SBIN_PATH
    return env


@cache
def postfix_defaults(*names: str) -> dict[str, str]:
    """Built-in defaults (`postconf -d`) of the installed Postfix for the named parameters."""
    postconf = _which("postconf")
    if postconf is None:
        raise RuntimeError("postconf is not installed (Debian package 'postfix')")
    out = subprocess.run([postconf, "-d", *names], env=_env(), capture_output=True, text=True,
                         check=True, timeout=30).stdout
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            values[key.strip()] = value.strip()
        elif line.endswith(" ="):
            values[line[:-2].strip()] = ""
    return values


def postfix_version() -> str:
    """The installed Postfix's mail_version, e.g. "3.7.11"."""
    return postfix_defaults("mail_version")["mail_version"]


def compatibility_level() -> str:
    """The current compatibility_level: since Postfix 3.6 levels are release numbers."""
    major, minor = (int(part) for part in postfix_version().split(".")[:2])
    return f"{major}.{minor}" if (major, minor) >= (3, 6) else "2"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (racy by nature: use it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    """Whether a TCP socket is in LISTEN state on host:port, read from /proc/net/tcp without
    connecting (a probe connection would reach smtpd and the milter as a real client)."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    addr = "{:08X}".format(struct.unpack("=I", socket.inet_aton(host))[0])
    wanted = {f"{addr}:{port:04X}", f"00000000:{port:04X}"}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] in wanted and fields[3] == "0A":
            return True
    return False


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (PID 1 here may be slow to reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_master_of(pid: int, queue_dir: Path, daemon_directory: str) -> bool:
    """Whether `pid` is a Postfix master(8) working in `queue_dir` (not a recycled PID)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return exe == os.path.join(daemon_directory, "master") and (
        os.path.realpath(cwd) == os.path.realpath(queue_dir)
    )


def _group_members(pgid: int, daemon_directory: str) -> list[int]:
    """Live processes in process group `pgid` that run a Postfix daemon program."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X") and exe.startswith(
            daemon_directory.rstrip("/") + "/"
        ):
            members.append(int(entry.name))
    return members


def _reachable_by(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether user `uid` (in groups `gids`) may search `path` and every directory above it."""
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid in gids:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


@dataclass(frozen=True)
class Delivery:
    """One message as the sink received it from Postfix."""

    name: str  # NNNNNNNN, in order of arrival
    mail_from: str
    rcpt_tos: tuple[str, ...]
    helo: str
    client_addr: str
    data: bytes  # the full message, CRLF line ends, as Postfix relayed it


class PostfixInstance:
    """A private Postfix (plus SMTP sink) under `workdir`; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        milter: str | None,
        smtpd_port: int | None = None,
        milter_macros: dict[str, str] | None = None,
        extra_main_cf: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.milter = milter
        self._auto_port = smtpd_port is None
        self.smtp_port: int = smtpd_port or 0
        self.milter_macros = dict(milter_macros or {})
        for key in self.milter_macros:
            if key not in MILTER_MACRO_PARAMETERS:
                raise ValueError(f"unknown milter macro parameter {key!r}: "
                                 f"use one of {', '.join(MILTER_MACRO_PARAMETERS)}")
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = self.workdir / "conf"
        self.queue_dir = self.workdir / "queue"
        self.sink_dir = self.workdir / "sink"
        self.maillog_path = self.workdir / "maillog"
        self.commands_log = self.workdir / "postfix-commands.log"
        self.sink_log = self.workdir / "sink.log"
        self.sink_port: int | None = None
        self.master_pid: int | None = None
        self._sink: subprocess.Popen[bytes] | None = None
        self._layout: tuple[Path, Path] | None = None  # data_dir, socket_dir
        self._postfix_started = False

    @property
    def data_dir(self) -> Path:
        """Postfix's data_directory: WORKDIR/data, or in a private dir under /tmp (see the
        module docstring) that lives as long as this object."""
        return self._ensure_layout()[0]

    @property
    def socket_dir(self) -> Path:
        """A directory the `postfix` user can reach, for a milter's UNIX socket (known before
        start(), so that `milter="unix:" + str(mx.socket_dir / "x.sock")` can be built)."""
        return self._ensure_layout()[1]

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start the sink and Postfix, wait for the SMTP listener."""
        if self._sink is not None or self._postfix_started:
            raise RuntimeError("this PostfixInstance is already started")
        postfix = _which("postfix")
        if postfix is None or not postfix_available():
            raise RuntimeError("Postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            raise RuntimeError("running Postfix needs root (postfix(1) is for the superuser)")
        atexit.register(self.stop)
        try:
            self._prepare_directories()
            self._start_sink()
            for attempt in range(3):
                if self._auto_port:
                    self.smtp_port = free_port()
                self._write_config()
                self._postfix_started = True  # perhaps: stop() then cleans up after a timeout
                result = self._postfix("start", timeout=START_TIMEOUT)
                if result.returncode == 0:
                    break
                port_taken = "Address already in use" in self.maillog()
                if not (self._auto_port and port_taken and attempt < 2):
                    raise RuntimeError(
                        f"`postfix -c {self.config_dir} start` failed ({result.returncode}):\n"
                        f"{result.stdout}{result.stderr}\n{self._diagnostics()}"
                    )
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Postfix (`postfix stop`, then make sure the master and its group are gone) and
        the sink. Safe to call again; start() may follow."""
        try:
            if self._postfix_started:
                self._stop_postfix()
        finally:
            self._postfix_started = False
            self._stop_sink()
            atexit.unregister(self.stop)

    def is_running(self) -> bool:
        """Whether this instance's master(8) process is alive."""
        return self.master_pid is not None and _alive(self.master_pid)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- what arrived, what was logged -----------------------------------------------------

    def deliveries(self) -> list[Delivery]:
        """Every message the sink has completely received so far, in order of arrival."""
        found = []
        for eml in sorted(self.sink_dir.glob("*.eml")):
            envelope = json.loads(eml.with_suffix(".json").read_text())
            found.append(Delivery(
                name=eml.stem,
                mail_from=envelope["mail_from"],
                rcpt_tos=tuple(envelope["rcpt_tos"]),
                helo=envelope["helo"],
                client_addr=envelope["client_addr"],
                data=eml.read_bytes(),
            ))
        return found

    def messages(self) -> list[bytes]:
        """Every message delivered to the sink so far (full text, with Postfix's headers)."""
        return [eml.read_bytes() for eml in sorted(self.sink_dir.glob("*.eml"))]

    def wait_for_messages(self, count: int, timeout: float = 30.0) -> list[bytes]:
        """Wait until the sink holds at least `count` messages; return all of them."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages()
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(messages)} of {count} messages reached the sink in {timeout} s\n"
                    f"--- mail queue:\n{self.mailq()}\n{self._diagnostics()}"
                )
            time.sleep(0.05)

    def maillog(self) -> str:
        """Postfix's log so far (maillog_file, written by postlogd)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maillog_tail(self, lines: int = 60) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until `count` maillog lines match the regex `pattern`; return the matching
        lines."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            matched = [line for line in self.maillog().splitlines() if regex.search(line)]
            if len(matched) >= count:
                return matched
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(matched)} of {count} maillog lines match {pattern!r} after "
                    f"{timeout} s\n{self._diagnostics()}"
                )
            time.sleep(0.05)

    def queue_ids(self) -> list[str]:
        """Queue IDs of the messages smtpd received, in order (from "QUEUEID: client=" lines)."""
        return re.findall(rf"postfix/smtpd\[\d+\]: ({QUEUE_ID}): client=", self.maillog())

    def log_for(self, queue_id: str) -> list[str]:
        """The maillog lines about one queue ID."""
        return [line for line in self.maillog().splitlines() if f": {queue_id}: " in line]

    def mailq(self) -> str:
        """`postqueue -p` for this instance: what is still queued (deferred, held, ...)."""
        postqueue = _which("postqueue") or "postqueue"
        result = subprocess.run([postqueue, "-c", str(self.config_dir), "-p"], env=_env(),
                                capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    def flush(self) -> None:
        """`postfix flush`: retry deferred mail now."""
        self._postfix("flush")

    def reload(self, main_cf: dict[str, str] | None = None) -> None:
        """Apply `main_cf` changes (if any) with `postconf -e`, then `postfix reload`."""
        if main_cf:
            self.extra_main_cf.update(main_cf)
            postconf = _which("postconf") or "postconf"
            settings = [f"{key}={value}" for key, value in main_cf.items()]
            subprocess.run([postconf, "-c", str(self.config_dir), "-e", *settings], env=_env(),
                           check=True, capture_output=True, timeout=30)
        result = self._postfix("reload")
        if result.returncode != 0:
            raise RuntimeError(f"postfix reload failed:\n{result.stderr}\n{self._diagnostics()}")

    # ---- configuration ---------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings of this instance, in order (extra_main_cf last)."""
        assert self.sink_port is not None
        macros = postfix_defaults(*MILTER_MACRO_PARAMETERS)
        settings: dict[str, str] = {
            "compatibility_level": compatibility_level(),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "syslog_name": "postfix",
            "myhostname": MYHOSTNAME,
            "mydomain": MYHOSTNAME.partition(".")[2],
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            # no local delivery: nothing is local, everything is relayed to the sink
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled in this test instance",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            # every client is "remote", as on an inbound MX: Postfix adds no Message-ID, Date
            # or From header and rewrites none, even for 127.0.0.1 (the inet_interfaces
            # address, which the default permit_inet_interfaces would treat as local)
            "local_header_rewrite_clients": "",
            "notify_classes": "",
            "biff": "no",
            # no DNS anywhere: clients stay "unknown[127.x.y.z]", the relay is an IP literal
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_address_preference": "ipv4",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # accept anything from anyone: the milter is the judge
            "smtpd_client_restrictions": "",
            "smtpd_helo_restrictions": "",
            "smtpd_sender_restrictions": "",
            # smtpd refuses to start unless a relay restriction like reject_unauth_destination
            # is reachable (not after a plain "permit"); static:OK permits every client,
            # including an address set with XCLIENT
            "smtpd_relay_restrictions": (
                "permit_mynetworks, check_client_access static:OK, reject_unauth_destination"
            ),
            "smtpd_recipient_restrictions": "permit",
            "smtpd_data_restrictions": "",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            # no throttling of test clients
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_error_sleep_time": "0s",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "1000",
            "in_flow_delay": "0s",
            "default_process_limit": "300",
            "default_destination_concurrency_limit": "50",
            # short queue timers: a deferred relay is retried within seconds
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "transport_retry_time": "1s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "smtp_connect_timeout": "5s",
            # the milter
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": self.milter or "",
            "smtpd_milter_maps": f"cidr:{self.config_dir / 'probe_milter_map.cidr'}",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_connect_timeout": "10s",
            "milter_command_timeout": "30s",
            "milter_content_timeout": "60s",
            **macros,
            **self.milter_macros,
        }
        settings.update(self.extra_main_cf)
        for key, value in settings.items():
            if "\n" in key or "\n" in value:
                raise ValueError(f"main.cf {key!r}: no newlines allowed")
        return settings

    def master_cf(self) -> str:
        """Debian's dist master.cf, adapted: smtpd on 127.0.0.1:smtp_port only, every other
        inet listener commented out, no service chrooted."""
        source = next((path for path in MASTER_CF_SOURCES if path.exists()), None)
        text = source.read_text() if source else ""
        out = [f"# Made by tests/integration/postfix.py from {source}"]
        have_smtpd = have_postlog = disabled = False
        for line in text.splitlines():
            if line[:1] in (" ", "\t") and line.strip():  # continues the previous entry
                out.append(f"#{line}" if disabled else line)
                continue
            disabled = False
            fields = line.split()
            if not fields or line.startswith("#") or len(fields) < 8:
                out.append(line)
                continue
            name, kind, private, unpriv, _chroot, wakeup, maxproc, *command = fields
            if kind == "inet":
                if name == "smtp" and command[:1] == ["smtpd"] and not have_smtpd:
                    name, have_smtpd = f"127.0.0.1:{self.smtp_port}", True
                else:
                    out.append(f"# disabled by the test harness (fixed port): {line}")
                    disabled = True
                    continue
            have_postlog |= kind == "unix-dgram" and command[:1] == ["postlogd"]
            out.append(" ".join([name, kind, private, unpriv, "n", wakeup, maxproc, *command]))
        if not have_smtpd:
            out.append(f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd")
        if not have_postlog:
            out.append("postlog unix-dgram n - n - 1 postlogd")
        return "\n".join(out) + "\n"

    # ---- internals -------------------------------------------------------------------------

    def _prepare_directories(self) -> None:
        for directory in (self.workdir, self.config_dir, self.queue_dir, self.sink_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # queue_directory must be root-owned and not group/other writable (postfix check)
        os.chown(self.queue_dir, 0, 0)
        self.queue_dir.chmod(0o755)
        self.config_dir.chmod(0o755)
        self._layout = None  # make data_dir and socket_dir again if they were removed
        self._ensure_layout()

    def _ensure_layout(self) -> tuple[Path, Path]:
        """Make data_dir and socket_dir where the `postfix` user can reach them."""
        if self._layout is not None and all(path.is_dir() for path in self._layout):
            return self._layout
        try:
            owner = pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError as exc:
            raise RuntimeError(f"no 'postfix' user or 'postdrop' group ({exc}): is Debian's "
                               "postfix package installed?") from None
        gids = set(os.getgrouplist(owner.pw_name, owner.pw_gid))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if _reachable_by(self.workdir, owner.pw_uid, gids):
            base = self.workdir
        elif self._layout is not None and _reachable_by(self._layout[0].parent, owner.pw_uid,
                                                        gids):
            base = self._layout[0].parent  # the private directory made before
        else:
            candidates = [Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")]
            parent = next((c for c in candidates if _reachable_by(c, owner.pw_uid, gids)), None)
            if parent is None:
                raise RuntimeError("found no directory the postfix user can reach for "
                                   "data_directory")
            base = Path(tempfile.mkdtemp(prefix="postfix-harness-", dir=parent))
            base.chmod(0o711)
            weakref.finalize(self, shutil.rmtree, str(base), True)
        data_dir, socket_dir = base / "data", base / "sockets"
        data_dir.mkdir(exist_ok=True)
        os.chown(data_dir, owner.pw_uid, 0)
        data_dir.chmod(0o700)
        socket_dir.mkdir(exist_ok=True)
        socket_dir.chmod(0o755)
        if base != self.workdir:
            for link, target in ((self.workdir / "data", data_dir),
                                 (self.workdir / "sockets", socket_dir)):
                with contextlib.suppress(OSError):
                    if link.is_symlink():
                        link.unlink()
                    link.symlink_to(target)
        self._layout = (data_dir, socket_dir)
        return self._layout

    def _write_config(self) -> None:
        lines = [f"# Made by tests/integration/postfix.py for {self.workdir}"]
        lines += [f"{key} = {value}" for key, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        (self.config_dir / "probe_milter_map.cidr").write_text(
            f"# start()'s probe connects from here: no milter for it\n{PROBE_ADDR}/32 DISABLE\n"
        )

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        postfix = _which("postfix") or "postfix"
        command = [postfix, "-c", str(self.config_dir), *args]
        try:
            result = subprocess.run(command, env=_env(), capture_output=True, text=True,
                                    timeout=timeout, cwd="/")
        except subprocess.TimeoutExpired as exc:
            result = subprocess.CompletedProcess(command, -1, str(exc.stdout or ""),
                                                 f"timed out after {timeout} s")
        with self.commands_log.open("a") as log:
            log.write(f"$ {' '.join(command)}  -> {result.returncode}\n"
                      f"{result.stdout}{result.stderr}")
        return result

    def _start_sink(self) -> None:
        port_file = self.workdir / "sink.port"
        port_file.unlink(missing_ok=True)
        with self.sink_log.open("ab") as log:
            self._sink = subprocess.Popen(
                [sys.executable, str(SINK_SCRIPT), "--dir", str(self.sink_dir),
                 "--port-file", str(port_file), "--host", "127.0.0.1", "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if self._sink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SMTP sink did not start:\n{self._read(self.sink_log)}")
            time.sleep(0.02)
        self.sink_port = int(port_file.read_text())

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pid_file = self.queue_dir / "pid" / "master.pid"
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pid_file.read_text().split()[0])
            if self.master_pid is not None and _listening("127.0.0.1", self.smtp_port):
                break
            if time.monotonic() > deadline or (
                self.master_pid is not None and not _alive(self.master_pid)
            ):
                raise RuntimeError(
                    f"Postfix did not come up on 127.0.0.1:{self.smtp_port} within "
                    f"{START_TIMEOUT} s (master pid {self.master_pid})\n{self._diagnostics()}"
                )
            time.sleep(0.05)
        # smtpd is spawned on demand and dies at once on a bad configuration: make sure it
        # greets, from PROBE_ADDR, for which smtpd_milter_maps turns the milters off
        while True:
            banner = ""
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.smtp_port),
                    timeout=max(0.5, deadline - time.monotonic()),
                    source_address=(PROBE_ADDR, 0),
                ) as probe:
                    banner = probe.makefile("rb").readline().decode(errors="replace")
                    with contextlib.suppress(OSError):
                        probe.sendall(b"QUIT\r\n")
                        probe.recv(1024)
            except OSError:
                pass
            if banner.startswith("220"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Postfix's smtpd on 127.0.0.1:{self.smtp_port} did not greet within "
                    f"{START_TIMEOUT} s (got {banner!r})\n{self._diagnostics()}"
                )
            time.sleep(0.1)

    def _stop_postfix(self) -> None:
        daemon_directory = postfix_defaults("daemon_directory")["daemon_directory"]
        pid = self.master_pid
        if pid is None:  # start() failed before it saw the master: trust only a live one
            with contextlib.suppress(OSError, ValueError):
                candidate = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
                if _is_master_of(candidate, self.queue_dir, daemon_directory):
                    pid = candidate
        self._postfix("stop", timeout=20)
        if pid is None:
            return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid) and _is_master_of(pid, self.queue_dir, daemon_directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # the master TERMs its process group on the way out; kill any straggler by its PID
        deadline = time.monotonic() + 5
        while (stragglers := _group_members(pid, daemon_directory)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        for straggler in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(straggler, signal.SIGKILL)
        self.master_pid = None

    def _stop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is None or sink.poll() is not None:
            return
        sink.terminate()
        try:
            sink.wait(5)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(5)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        return (f"--- maillog tail ({self.maillog_path}):\n{self.maillog_tail()}\n"
                f"--- postfix commands:\n{self._read(self.commands_log)[-3000:]}")

