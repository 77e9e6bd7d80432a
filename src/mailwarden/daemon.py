"""The daemon: bind, drop privileges, run milter workers, reload on SIGHUP, drain on SIGTERM.

A master process binds the milter socket once (libmilter's opensocket) and forks `workers`
processes that each run libmilter's loop on that socket; libmilter spreads connections across
them, and several processes get past the GIL. The master never runs libmilter itself, so it keeps
Python's signal handling:

- SIGHUP: read and validate the configuration; if it is broken, log why (file, line, key) and
  keep the running one. If it is good, start new workers with it, then ask the old ones to stop:
  they stop accepting, finish the transactions in progress (bounded by drain_timeout) and exit,
  so no connection is dropped.
- SIGTERM/SIGINT: ask every worker to stop the same way, wait for them, exit.
- A worker that dies unexpectedly is replaced.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import Milter
import milter

from mailwarden.config import Config, ConfigError, configure_logging, load
from mailwarden.dns import Resolver, system_nameservers
from mailwarden.milter import Runtime, Session
from mailwarden.policy.engine import Engine

log = logging.getLogger("mailwarden.daemon")

MILTER_FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
# libmilter gives up on an MTA that says nothing for this long (seconds).
MILTER_TIMEOUT = 600


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


def _socket_path(listen: str) -> Path | None:
    kind, _, rest = listen.partition(":")
    return Path(rest) if kind in ("unix", "local") else None


@dataclass
class Master:
    config_path: str
    config: Config
    runtime: Runtime
    workers: dict[int, Runtime] = field(default_factory=dict)  # pid -> its runtime
    draining: dict[int, float] = field(default_factory=dict)  # pid -> deadline for SIGKILL
    stopping: bool = False
    reload_requested: bool = False

    # -- start -------------------------------------------------------------------------------
    def bind(self) -> None:
        """Register the callbacks and open the socket (still with the privileges we started
        with), then drop to the configured user and group."""
        milter.set_flags(MILTER_FLAGS)
        milter.set_connect_callback(Milter.connect_callback)
        milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
        milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
        milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        milter.set_close_callback(Milter.close_callback)
        path = _socket_path(self.config.listen)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        milter.setconn(self.config.listen)
        milter.settimeout(MILTER_TIMEOUT)
        milter.register("mailwarden", data=lambda ctx: ctx.getpriv().data(),
                        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                        negotiate=Milter.negotiate_callback)
        milter.opensocket(True)
        uid, gid = self._identity()
        if path is not None:
            os.chmod(path, self.config.socket_mode)
            if uid is not None and gid is not None:
                os.chown(path, uid, gid)
            # libmilter removes the socket file when a worker closes its listener; a second
            # link to the same socket lets the master put the name back (see _keep_socket).
            keep = path.with_name(path.name + ".keep")
            with contextlib.suppress(FileNotFoundError):
                keep.unlink()
            os.link(path, keep)
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            log.info("running as %s:%s", self.config.user, self.config.group or gid)
        log.info("listening on %s", self.config.listen)

    def _identity(self) -> tuple[int | None, int | None]:
        if not self.config.user:
            return None, None
        if os.geteuid() != 0:
            log.warning("not started as root: staying %s instead of %s",
                        pwd.getpwuid(os.geteuid()).pw_name, self.config.user)
            return None, None
        try:
            entry = pwd.getpwnam(self.config.user)
        except KeyError:
            raise SystemExit(f"mailwarden: user {self.config.user!r} does not exist "
                             f"({self.config.path}: user)") from None
        gid = entry.pw_gid
        if self.config.group:
            try:
                gid = grp.getgrnam(self.config.group).gr_gid
            except KeyError:
                raise SystemExit(f"mailwarden: group {self.config.group!r} does not exist "
                                 f"({self.config.path}: group)") from None
        return entry.pw_uid, gid

    def _keep_socket(self) -> None:
        path = _socket_path(self.config.listen)
        if path is None:
            return
        keep = path.with_name(path.name + ".keep")
        if keep.exists() and not path.exists():
            with contextlib.suppress(OSError):
                os.link(keep, path)

    # -- workers -----------------------------------------------------------------------------
    def spawn(self, runtime: Runtime) -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                code = _worker(runtime)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = runtime
        return pid

    def start_workers(self) -> None:
        for _ in range(self.config.workers):
            self.spawn(self.runtime)
        log.info("started %d worker(s)", self.config.workers)

    def retire(self, pids: list[int]) -> None:
        """Ask workers to stop: they finish what they are doing, then exit."""
        deadline = time.monotonic() + self.config.drain_timeout + 5
        for pid in pids:
            self.workers.pop(pid, None)
            self.draining[pid] = deadline
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

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
            _notify("READY=1")
            return False
        for key in ("listen", "user", "group", "socket_mode"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect only after a restart", key)
        configure_logging(new.log_level)
        self.config = new
        self.runtime = build_runtime(new)
        old = list(self.workers)
        self.start_workers()
        self.retire(old)
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
            if pid in self.draining:
                del self.draining[pid]
                continue
            if pid in self.workers:
                runtime = self.workers.pop(pid)
                log.error("worker %d ended unexpectedly (status %d); starting another", pid,
                          status)
                if not self.stopping:
                    time.sleep(0.5)
                    self.spawn(runtime if runtime is self.runtime else self.runtime)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for pid, deadline in list(self.draining.items()):
            if now > deadline:
                log.warning("worker %d did not finish in time; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.draining[pid] = now + 3600

    def serve(self) -> int:
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.start_workers()
        _notify("READY=1")
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            self.reap()
            self.kill_overdue()
            self._keep_socket()
            time.sleep(0.1)
        _notify("STOPPING=1")
        log.info("stopping: waiting for transactions in progress")
        self.retire(list(self.workers))
        while self.draining:
            self.reap()
            self.kill_overdue()
            time.sleep(0.1)
        path = _socket_path(self.config.listen)
        if path is not None:
            for name in (path, path.with_name(path.name + ".keep")):
                with contextlib.suppress(OSError):
                    name.unlink()
        log.info("stopped")
        return 0


def _worker(runtime: Runtime) -> int:
    """Run libmilter's loop until SIGTERM, then let running sessions finish."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    Milter.factory = lambda: Session(runtime)
    milter.main()
    deadline = time.monotonic() + runtime.config.drain_timeout
    while runtime.active > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if runtime.active > 0:
        log.warning("exiting with %d session(s) unfinished", runtime.active)
    return 0


def run(config_path: str) -> int:
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    master = Master(config_path, config, build_runtime(config))
    try:
        master.bind()
    except milter.error as exc:
        print(f"mailwarden: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 1
    return master.serve()
