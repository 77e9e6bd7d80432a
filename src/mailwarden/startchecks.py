"""What the daemon checks at start-up, once it runs as the configured user, before any worker:
the permissions of the signing keys, the configuration file and the DMARC store, and whether
the store opens. A problem stops the start with its reason (`SystemExit`)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from mailwarden.config import Config

log = logging.getLogger("mailwarden.daemon")


def check_store(config: Config) -> None:
    """Open the DMARC report store now, as the user the workers run as, so that a bad
    path or permission stops the start instead of every message. A store on a read-only
    or full file system does not stop it: that state may pass, and refusing to start would
    tempfail all mail for want of report rows; the workers skip recording (logged once)
    and try again."""
    if not config.dmarc.store:
        return
    from mailwarden.dmarc.recorder import unavailable_for_now
    from mailwarden.dmarc.store import Store

    try:
        Store.open(config.dmarc.store).close()
    except Exception as exc:
        why = unavailable_for_now(config.dmarc.store, exc)
        if why:
            log.error("the DMARC store %s cannot be opened (%s; %s): starting anyway; "
                      "evaluations are not recorded until it can", config.dmarc.store,
                      exc.__cause__ or exc, why)
            return
        raise SystemExit(f"mailwarden: cannot open the DMARC store "
                         f"{config.dmarc.store}: {exc}") from None


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
