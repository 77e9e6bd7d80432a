"""Start the real `mailwarden run` daemon for a test, and stop it by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import yaml


class Daemon:
    """`mailwarden run --config WORKDIR/mailwarden.yaml`, its log in WORKDIR/daemon.log."""

    def __init__(self, workdir: Path, config: dict[str, object],
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = {**os.environ, **env} if env else None
        self.config_path = workdir / "mailwarden.yaml"
        self.log_path = workdir / "daemon.log"
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    @property
    def socket(self) -> str:
        return str(self.config["listen"])

    def write_config(self, config: dict[str, object]) -> None:
        if os.geteuid() == 0 and "user" not in config:
            # The daemon refuses to run its checks as root unless told so explicitly; test
            # directories under root's pytest tmp are not readable by a system user.
            config = {"user": "root", **config}
        # replaced in one step, as configuration management does: a worker still reading the
        # previous version for a reload must not see a half-written file
        staged = self.config_path.with_suffix(".yaml.new")
        staged.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(staged, self.config_path)

    def start(self, timeout: float = 15.0) -> None:
        seen = len(self.log())  # a restart in the same directory: only new lines count
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailwarden", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "started" in self.log()[seen:] or self._accepting():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"mailwarden exited at start:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"mailwarden did not start:\n{self.log()}")

    def _accepting(self) -> bool:
        """The milter socket takes connections (for configs that log only warnings)."""
        kind, _, rest = self.socket.partition(":")
        try:
            if kind in ("unix", "local"):
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(0.2)
                    probe.connect(rest)
                return True
            port, _, host = rest.partition("@")
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} (x{count}) not in the daemon log:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"mailwarden did not stop in {timeout} s:\n{self.log()}") from None

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
