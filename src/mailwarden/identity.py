"""Who the daemon runs as: the configured `user`, `group` and `socket_group`, resolved to ids,
with the reasons a start is refused. Shared by `mailwarden run` and `mailwarden check-config`,
so that check-config refuses exactly what run would."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from mailwarden.config import Config
from mailwarden.server import socket_path

log = logging.getLogger("mailwarden.daemon")


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int | None  # None: stay as we are (not started as root)
    gid: int | None
    socket_gid: int | None  # the group of the unix socket, when `socket_group` names one

    @property
    def root_allowed(self) -> bool:
        return self.uid == 0


def ids_of(user: str) -> tuple[int, int] | None:
    """(uid, primary gid) of a user; None when there is no such user."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def uid_of(user: str) -> int | None:
    ids = ids_of(user)
    return ids[0] if ids else None


def identity(config: Config) -> Identity:
    """The ids to drop to; SystemExit with the reason when a start must be refused. Started as
    root, a `user` is required: checks never run as root unless `user:` names root itself."""
    socket_gid = _socket_group(config)
    if os.geteuid() != 0:
        if config.user and uid_of(config.user) != os.geteuid():
            log.warning("not started as root: staying %s instead of %s",
                        pwd.getpwuid(os.geteuid()).pw_name, config.user)
        return Identity(None, None, socket_gid)
    if not config.user:
        raise SystemExit(
            f"mailwarden: refusing to run as root: {config.path} names no `user:` "
            f"to drop to, and checks never run as root. Set `user:` (and `group:`) to an "
            f"unprivileged account, e.g. `user: mailwarden` (`user: root` keeps root's "
            f"privileges: for tests only)")
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise SystemExit(f"mailwarden: user {config.user!r} does not exist "
                         f"({config.path}: user)") from None
    gid = entry.pw_gid
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise SystemExit(f"mailwarden: group {config.group!r} does not exist "
                             f"({config.path}: group)") from None
    return Identity(entry.pw_uid, gid, socket_gid)


def _socket_group(config: Config) -> int | None:
    """The gid of `socket_group` (the group the MTA runs as, e.g. postfix), or None: the
    socket then gets the daemon's group."""
    name = config.socket_group
    if not name or socket_path(config.listen) is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SystemExit(f"mailwarden: group {name!r} does not exist "
                         f"({config.path}: socket_group)") from None


def drop(uid: int, gid: int) -> None:
    """Become uid:gid for good, with no supplementary groups."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
