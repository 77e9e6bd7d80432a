"""Commands run as root on a SQLite report store act as the store's owner.

`mailwarden dmarc report` (the nightly timer runs it as the daemon's user) creates the report
lock next to the store, and SQLite creates the `-wal` and `-shm` files when they are missing. Run
once by hand as root, those files used to stay `root:root` and every later run as the daemon's
user failed on them. Such a command now drops to the store's owner first: the owner of its file,
else of its directory, else the daemon's configured `user`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailwarden.dmarc.backends import sqlite_path
from mailwarden.identity import drop, ids_of


def owner_of(url: str, user: str | None) -> tuple[int, int] | None:
    """(uid, gid) a root command on this store should run as; None: stay as it is."""
    path = sqlite_path(url)
    if path is None:  # PostgreSQL: no files of ours
        return None
    for candidate in (Path(path), Path(path).parent):
        try:
            info = candidate.stat()
        except OSError:
            continue
        if info.st_uid != 0:
            return info.st_uid, info.st_gid
        break
    ids = ids_of(user) if user else None
    return ids if ids is not None and ids[0] != 0 else None


def become_store_owner(url: str, user: str | None) -> None:
    """Run as root: drop to the store's owner for good."""
    if os.geteuid() != 0:
        return
    found = owner_of(url, user)
    if found is not None:
        drop(*found)
