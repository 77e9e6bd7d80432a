"""What the daemon checks at start-up, once it runs as the configured user, before any worker:
the permissions of the signing keys, the configuration file and the DMARC store, and whether
the store opens. A problem stops the start with its reason (`SystemExit`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from enum import StrEnum
from pathlib import Path

from mailwarden.config import Config

log = logging.getLogger("mailwarden.daemon")


class StoreState(StrEnum):
    NONE = "none"  # no store configured
    OK = "ok"
    UNAVAILABLE = "unavailable"  # for now: the daemon starts and records once it is back
    BROKEN = "broken"  # a configuration to fix: the daemon does not start


def store_state(config: Config) -> tuple[StoreState, str]:
    """Open the DMARC report store now: its state, and what to tell the admin."""
    if not config.dmarc.store:
        return StoreState.NONE, "no DMARC report store configured"
    from mailwarden.dmarc.recorder import RETRY_OPEN, unavailable_for_now
    from mailwarden.dmarc.store import Store, redact, sqlite_path

    shown = redact(config.dmarc.store)
    try:
        Store.open(config.dmarc.store).close()
    except Exception as exc:
        why = unavailable_for_now(config.dmarc.store, exc)
        cause = " ".join(str(exc.__cause__ or exc).split())  # one line
        if why:
            # PostgreSQL's reason quotes the error already; SQLite's names the file system
            detail = why if sqlite_path(config.dmarc.store) is None else f"{cause}; {why}"
            return StoreState.UNAVAILABLE, (
                f"the DMARC store {shown} cannot be opened now ({detail}): the daemon starts "
                f"anyway and records evaluations once it can (retried every {RETRY_OPEN:g} s)")
        return StoreState.BROKEN, f"cannot open the DMARC store {shown}: {cause}"
    return StoreState.OK, f"the DMARC store {shown} is open"


def check_store(config: Config) -> None:
    """Open the DMARC report store now, as the user the workers run as, so that a bad
    path, permission or password stops the start instead of every message. A store that is
    unavailable for a while -- a read-only or full file system, a PostgreSQL server that is
    down or full -- does not stop it: refusing to start would tempfail all mail for want of
    report rows; the workers skip recording (logged once) and try again."""
    state, text = store_state(config)
    if state is StoreState.UNAVAILABLE:
        log.error("%s", text)
    elif state is StoreState.BROKEN:
        raise SystemExit(f"mailwarden: {text}")


def check_permissions(config: Config, config_path: str) -> None:
    """As the user the workers run as: the signing keys (owner root or us, not writable by
    others, readable by us), the configuration file and the DMARC store (SQLite: neither
    the file nor its directory writable by everyone). A problem stops the start."""
    from mailwarden.dkim.keys import access_problem
    from mailwarden.dmarc.store import sqlite_path

    problems = []
    for key in config.signing.keys:
        problem = access_problem(key.path)
        if problem:
            problems.append(f"signing key {key.path} ({key.domain}/{key.selector}): "
                            f"{problem}")
    with contextlib.suppress(OSError):
        if os.stat(config_path).st_mode & 0o002:
            problems.append(f"the configuration file {config_path} is writable by "
                            f"everyone: chmod o-w")
    store = sqlite_path(config.dmarc.store) if config.dmarc.store else None
    if store is not None:
        problems += store_problems(store)
    if problems:
        raise SystemExit("mailwarden: refusing to start:\n  " + "\n  ".join(problems))


def store_problems(path: str) -> list[str]:
    """A SQLite store whose file (or journal) or directory anyone may write to could be
    replaced or fed forged rows: refused. A directory not made yet is judged by the closest
    one that exists (where it would be made)."""
    problems = []
    store = Path(path)
    for candidate in (store, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm",
                                                                       "-journal"))):
        with contextlib.suppress(OSError):
            if candidate.lstat().st_mode & 0o002:
                problems.append(f"the DMARC store file {candidate} is writable by everyone: "
                                f"chmod o-w")
    directory = store.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    with contextlib.suppress(OSError):
        if directory.stat().st_mode & 0o002:
            problems.append(f"the DMARC store's directory {directory} is writable by everyone: "
                            f"keep the store in a directory of its own (e.g. "
                            f"/var/lib/mailwarden, mode 0750)")
    return problems


def preflight(config: Config, config_path: str) -> tuple[list[str], str]:
    """Every check `mailwarden run` makes before it serves, without serving: the user, group
    and socket group; then, as the daemon's user (in a child process when started as root),
    the permissions of keys, configuration file and store, and whether the store opens.
    Returns the problems that would stop a start, and what to say about the store."""
    from mailwarden.identity import identity, uid_of

    if os.geteuid() != 0 and config.user and uid_of(config.user) != os.geteuid():
        return [], (f"not checked: the daemon runs as {config.user}; run check-config as "
                    f"root to check the keys, the configuration file and the store as that user")
    try:
        who = identity(config)
    except SystemExit as exc:
        return [str(exc).removeprefix("mailwarden: ")], ""
    if who.uid is None or who.gid is None or who.uid == os.geteuid():
        return _as_daemon_user(config, config_path)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: becomes the daemon's user, checks, reports, ends
        code = 1
        try:
            os.close(read)
            from mailwarden.identity import drop

            drop(who.uid, who.gid)
            with os.fdopen(write, "w") as out:
                json.dump(_as_daemon_user(config, config_path), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if not text or os.waitstatus_to_exitcode(status) != 0:
        return ["the checks as the daemon's user failed to run"], ""
    problems, store_text = json.loads(text)
    return list(problems), str(store_text)


def _as_daemon_user(config: Config, config_path: str) -> tuple[list[str], str]:
    problems = []
    try:
        Path(config_path).read_bytes()
    except OSError as exc:
        problems.append(f"{config.user or 'the daemon'} cannot read {config_path} "
                        f"({exc.strerror}): a SIGHUP reload would fail")
    try:
        check_permissions(config, config_path)
    except SystemExit as exc:
        problems.append(str(exc).removeprefix("mailwarden: "))
    state, text = store_state(config)
    if state is StoreState.BROKEN:
        problems.append(text)
    return problems, text
