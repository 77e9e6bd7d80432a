"""The daemon: bind, drop privileges, run milter workers, reload on SIGHUP, drain on SIGTERM.

A master process binds the milter socket once and forks `workers` processes that each accept
connections on it (`server.serve`, a thread per MTA connection), so several processes get past
the GIL. The master serves no connection itself and talks to each worker over a pipe:

- SIGHUP: the master reads and validates the configuration. A broken one is refused with its
  file, line and key, and the running one stays in force. A good one is sent to the workers as
  "reload": each builds the new policy and gives it to new connections; connections in progress
  finish under the policy they started with. Nothing is restarted, nothing is dropped.
- SIGTERM/SIGINT: the workers stop accepting and close their copy of the listening socket,
  finish the transactions in progress within `drain_timeout`, and exit; the master closes the
  socket, so the MTA's new connections fail at once (and it applies its milter_default_action)
  instead of waiting.
- A worker that dies unexpectedly is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailwarden import metrics
from mailwarden.config import Config, ConfigError
from mailwarden.config.build import load
from mailwarden.dns import Resolver, system_nameservers
from mailwarden.identity import drop, identity
from mailwarden.logsetup import configure_logging
from mailwarden.metrics import Endpoint
from mailwarden.policy.engine import Engine
from mailwarden.server import LISTEN_BACKLOG, LoadBoard, open_listener, serve, socket_path
from mailwarden.stage import ACTIVE, Runtime
from mailwarden.startchecks import check_permissions, check_store
from mailwarden.transports.native import Session

log = logging.getLogger("mailwarden.daemon")

RELOAD, DRAIN = b"R", b"D"


def build_runtime(config: Config) -> Runtime:
    resolver = Resolver(
        nameservers=list(config.dns.nameservers) or system_nameservers(),
        timeout=config.dns.timeout, lifetime=config.dns.lifetime,
        cache_size=config.dns.cache_size,
    )
    return Runtime.build(config, Engine(config, resolver))


def _notify(state: str) -> None:
    """sd_notify(3) for Type=notify units; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def _preload() -> None:
    """Import now what is otherwise imported on first use (the IDNA codec for non-ASCII
    names, the lazily built check registry), while the files are surely readable."""
    import encodings.idna  # noqa: F401
    import stringprep  # noqa: F401
    import unicodedata  # noqa: F401

    from mailwarden.checks import CHECKS

    "\u00e9xample.org".encode("idna")
    len(CHECKS)


@dataclass
class Worker:
    pid: int
    control: int  # write end of the worker's control pipe
    slot: int  # its place on the load board
    draining_since: float | None = None


@dataclass
class Master:
    config_path: str
    config: Config
    runtime: Runtime
    listener: socket.socket | None = None
    workers: dict[int, Worker] = field(default_factory=dict)
    stopping: bool = False
    reload_requested: bool = False
    loads: LoadBoard | None = None
    metrics: Endpoint | None = None
    root_allowed: bool = False  # `user:` names root itself

    # -- start -------------------------------------------------------------------------------
    def bind(self) -> None:
        """Open the socket (still with the privileges we started with), give it its group and
        mode, then drop to the configured user and group for good. Nothing before the drop
        looks at mail or asks DNS: the configuration and the signing keys are read, the socket
        is bound, that is all. Once dropped, the key files, the DMARC store and the
        configuration file are checked for ownership and permissions."""
        path = socket_path(self.config.listen)
        who = identity(self.config)
        uid, gid, socket_gid = who.uid, who.gid, who.socket_gid
        self.root_allowed = who.root_allowed
        # The socket is created owner-only, and opened up to socket_mode once its group is set
        # (its directory, if it has to be made, with the usual umask).
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        previous = os.umask(0o177)
        try:
            if self.config.transport == "libmilter":
                from mailwarden.transports import libmilter

                self.listener = libmilter.open_socket(self.config.listen, LISTEN_BACKLOG)
                if self.listener.family in (socket.AF_INET, socket.AF_INET6):
                    # inherited by the accepted sockets: no Nagle/delayed-ACK stall per reply
                    self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self.listener = open_listener(self.config.listen)
        finally:
            os.umask(previous)
        if self.config.metrics_listen:
            self.metrics = Endpoint(self.config.metrics_listen, (uid, gid))
            self.metrics.start()
        if path is not None:
            group = socket_gid if socket_gid is not None else gid
            try:
                if uid is not None or group is not None:
                    os.chown(path, -1 if uid is None else uid, -1 if group is None else group)
            except OSError as exc:
                name = self.config.socket_group or self.config.group or group
                raise SystemExit(f"mailwarden: cannot give the socket {path} to group "
                                 f"{name}: {exc.strerror}") from None
            os.chmod(path, self.config.socket_mode)
        if uid is not None and gid is not None:
            _preload()
            drop(uid, gid)
            log.info("running as %s:%s", self.config.user, self.config.group or gid)
            try:
                Path(self.config_path).read_bytes()
            except OSError as exc:
                log.warning("%s cannot read %s (%s): a SIGHUP reload will fail",
                            self.config.user, self.config_path, exc.strerror)
        if os.geteuid() == 0:
            log.warning("running as root (user: %s): every check runs with root's privileges; "
                        "give `user:` an unprivileged account", self.config.user)
        check_permissions(self.config, self.config_path)
        check_store(self.config)
        log.info("listening on %s", self.config.listen)

    def spawn(self) -> None:
        if self.loads is None:
            self.loads = LoadBoard(self.config.workers)
        used = {worker.slot for worker in self.workers.values()}
        slot = next(n for n in range(self.loads.slots) if n not in used)
        self.loads.set(slot, 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(write_end)
                for other in self.workers.values():
                    os.close(other.control)
                assert self.listener is not None
                if os.geteuid() == 0 and not self.root_allowed:
                    raise SystemExit("mailwarden: a worker is root: refusing to serve")
                code = _worker(self.config_path, self.runtime, read_end, self.listener,
                               self.loads, slot)
            except BaseException:
                log.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(read_end)
        self.workers[pid] = Worker(pid, write_end, slot)

    def tell(self, worker: Worker, command: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(worker.control, command)

    # -- signals and the main loop -------------------------------------------------------------
    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def reload(self) -> bool:
        _notify("RELOADING=1")
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays in force: %s", exc)
            metrics.METRICS.reload(False)
            _notify("READY=1")
            return False
        metrics.METRICS.reload(True)
        for key in ("listen", "user", "group", "socket_group", "socket_mode", "workers",
                    "metrics_listen", "transport"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect only after a restart", key)
        configure_logging(new.log_level, new.log)
        self.config = new
        self.runtime = build_runtime(new)  # for workers started from now on
        for worker in self.workers.values():
            self.tell(worker, RELOAD)
        log.info("configuration reloaded from %s", self.config_path)
        _notify("READY=1")
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.control)
            if self.loads is not None:
                self.loads.set(worker.slot, -1)  # its connections are gone with it
            if self.metrics is not None:
                self.metrics.process_gone(pid)
            if not self.stopping:
                metrics.METRICS.error("worker")
                log.error("worker %d ended unexpectedly (status %d); starting another", pid,
                          status)
                time.sleep(0.2)
                self.spawn()

    def serve(self) -> int:
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        for _ in range(self.config.workers):
            self.spawn()
        log.info("started %d worker(s)", self.config.workers)
        _notify("READY=1")
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            self.reap()
            time.sleep(0.05)
        return self.shutdown()

    def shutdown(self) -> int:
        _notify("STOPPING=1")
        log.info("stopping: finishing the transactions in progress")
        for worker in self.workers.values():
            self.tell(worker, DRAIN)
        path = socket_path(self.config.listen)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.listener is not None:
            self.listener.close()
        deadline = time.monotonic() + self.config.drain_timeout + 5
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for worker in list(self.workers.values()):
            log.warning("worker %d did not finish in time; killing it", worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        while self.workers:
            self.reap()
            time.sleep(0.05)
        if self.metrics is not None:
            self.metrics.close()
        log.info("stopped")
        return 0


def _worker(config_path: str, runtime: Runtime, control: int, listener: socket.socket,
            loads: LoadBoard, slot: int) -> int:
    """Serve connections with the configured transport; the control pipe brings reload and
    drain requests."""
    # Only the master reacts to a terminal's ^C or to SIGHUP; it tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    current = [runtime]

    def reload() -> Runtime:
        try:
            config = load(config_path)
        except ConfigError as exc:
            log.error("reload failed in worker, keeping the running policy: %s", exc)
            return current[0]
        configure_logging(config.log_level, config.log)
        current[0] = build_runtime(config)
        return current[0]

    ACTIVE.publish = lambda value: loads.set(slot, value)
    if runtime.config.transport == "libmilter":
        from mailwarden.transports import libmilter

        # SIGTERM is the master's: a stray one must not make libmilter stop (and drop the
        # connections in progress); the master's drain request comes through the pipe
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        libmilter.serve(runtime, control, listener,
                        lambda command: reload() if command == RELOAD else None,
                        lambda: _drain(current[0].config.drain_timeout))
    else:
        serve(listener, control, lambda: Session(current[0]),
              lambda command: command == RELOAD and bool(reload()),
              lambda: loads.least_loaded(slot))
        _drain(current[0].config.drain_timeout)
    return 0


def _drain(timeout: float) -> None:
    """Wait for the connections in progress (no new ones come: the listener is closed)."""
    deadline = time.monotonic() + timeout
    while ACTIVE.value > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ACTIVE.value > 0:
        log.warning("drain: %d session(s) still open after %g s; exiting", ACTIVE.value, timeout)


def run(config_path: str) -> int:
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log)
    master = Master(config_path, config, build_runtime(config))
    try:
        master.bind()
    except OSError as exc:
        where = config.listen
        if master.listener is not None:
            where = f"{config.metrics_listen} (metrics)"
        print(f"mailwarden: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    return master.serve()
