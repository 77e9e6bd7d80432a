"""Least privilege, on the real daemon started as root: it refuses to run checks as root without
a `user:`, the master and the workers run as the configured user and group with no
supplementary group and no capability, the unix socket gets its group and mode, and the key
files, the DMARC store and the configuration file are checked for ownership and permissions
at startup, as the daemon's user."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import Daemon

from mailwarden.config import Config
from mailwarden.dkim.keys import access_problem, generate, write_private

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the daemon as root")

# The account the daemon drops to: the production one when it exists, else nobody.
USER = "mailwarden" if any(e.pw_name == "mailwarden" for e in pwd.getpwall()) else "nobody"
ENTRY = pwd.getpwnam(USER)
GROUP = grp.getgrgid(ENTRY.pw_gid).gr_name
# Another unprivileged account, for a key owned by somebody else.
OTHER = next(e for e in pwd.getpwall() if e.pw_uid not in (0, ENTRY.pw_uid)
             and e.pw_name in ("daemon", "bin", "nobody", "www-data"))


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory under /tmp that the daemon's user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mw-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def base_config(place: Path, **extra: Any) -> dict[str, Any]:
    return {"listen": f"unix:{place}/milter.sock", "authserv_id": "mx.test.example",
            "workers": 2, "drain_timeout": 2, "log_level": "info", **extra}


@contextlib.contextmanager
def started(place: Path, config: dict[str, Any]) -> Iterator[Daemon]:
    """The daemon, once it has logged that its workers started (after every startup check:
    the harness may return as soon as the socket accepts, before the checks are done)."""
    with Daemon(place, config) as daemon:
        daemon.wait_for_log(f"started {config['workers']} worker(s)")
        yield daemon


def refused(place: Path, config: dict[str, Any]) -> str:
    """Start `mailwarden run` (not through the Daemon harness, which may add a `user:`); it
    must exit with an error. Its output."""
    path = place / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "mailwarden", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def signing_key(place: Path, owner: int, mode: int = 0o600) -> Path:
    keys = place / "keys"
    keys.mkdir(exist_ok=True)
    path = keys / f"k{len(list(keys.iterdir()))}.pem"
    write_private(generate("rsa", 2048), str(path))
    os.chown(path, owner, -1)
    path.chmod(mode)
    return path


def with_key(place: Path, key: Path) -> dict[str, Any]:
    return base_config(place, user=USER, signing={"keys": [
        {"domain": "example.org", "selector": "s1", "key": str(key)}]})


# ---- who runs what -----------------------------------------------------------------------------


def test_started_as_root_without_user_refuses(place: Path) -> None:
    out = refused(place, base_config(place))
    assert "refusing to run as root" in out and "names no `user:`" in out, out
    assert "started" not in out  # what a harness may wait for in the log
    assert not (place / "milter.sock").exists()  # refused before binding anything


def test_master_and_workers_run_as_the_user_without_groups_or_capabilities(
        place: Path) -> None:
    with started(place, base_config(place, user=USER, group=GROUP)) as daemon:
        assert daemon.process is not None
        master = daemon.process.pid
        workers = children(master)
        assert len(workers) == 2, workers
        for pid in (master, *workers):
            seen = status(pid)
            uids = seen["Uid"].split()
            gids = seen["Gid"].split()
            assert uids == [str(ENTRY.pw_uid)] * 4, (pid, seen["Uid"])  # real, eff, saved, fs
            assert gids == [str(ENTRY.pw_gid)] * 4, (pid, seen["Gid"])
            assert seen["Groups"] == "", (pid, seen["Groups"])  # setgroups([]) was done
            assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0, seen
        log = daemon.log()
    assert f"running as {USER}:{GROUP}" in log, log
    assert "running as root" not in log


def test_user_root_is_an_explicit_choice_and_warned_about(place: Path) -> None:
    with started(place, base_config(place, user="root")) as daemon:
        assert daemon.process is not None
        assert status(daemon.process.pid)["Uid"].split()[0] == "0"
        log = daemon.wait_for_log("running as root")
    assert "every check runs with root's privileges" in log


# ---- the socket --------------------------------------------------------------------------------


def test_socket_gets_the_daemons_user_group_and_mode(place: Path) -> None:
    with started(place, base_config(place, user=USER, group=GROUP, socket_mode="0640")):
        info = os.stat(place / "milter.sock")
    assert (info.st_uid, info.st_gid) == (ENTRY.pw_uid, ENTRY.pw_gid)
    assert info.st_mode & 0o7777 == 0o640


@pytest.mark.skipif("socket_group" not in Config.__dataclass_fields__,
                    reason="the configuration has no socket_group key yet")
def test_socket_group_gives_the_socket_to_the_mtas_group(place: Path) -> None:
    other = grp.getgrgid(OTHER.pw_gid).gr_name  # a group the daemon itself is not in
    with started(place, base_config(place, user=USER, group=GROUP, socket_group=other,
                                   socket_mode="0660")) as daemon:
        info = os.stat(place / "milter.sock")
        assert daemon.process is not None
        assert status(daemon.process.pid)["Groups"] == ""  # the socket's group is not ours
    assert (info.st_uid, info.st_gid) == (ENTRY.pw_uid, OTHER.pw_gid)
    assert info.st_mode & 0o7777 == 0o660


def test_unknown_socket_group_refuses(place: Path) -> None:
    if "socket_group" not in Config.__dataclass_fields__:
        pytest.skip("the configuration has no socket_group key yet")
    out = refused(place, base_config(place, user=USER, socket_group="no-such-group-here"))
    assert "group 'no-such-group-here' does not exist" in out, out


# ---- keys --------------------------------------------------------------------------------------


def test_key_only_root_can_read_refuses_at_start(place: Path) -> None:
    key = signing_key(place, owner=0)
    out = refused(place, with_key(place, key))
    assert f"signing key {key}" in out and f"{USER} cannot read it" in out, out
    assert "next reload" in out


def test_key_owned_by_another_user_refuses(place: Path) -> None:
    key = signing_key(place, owner=OTHER.pw_uid)
    out = refused(place, with_key(place, key))
    assert f"it belongs to {OTHER.pw_name}, neither root nor {USER}" in out, out


def test_group_writable_key_refuses(place: Path) -> None:
    key = signing_key(place, owner=ENTRY.pw_uid, mode=0o620)
    out = refused(place, with_key(place, key))
    assert "writable by group or others" in out, out


def test_key_of_the_daemons_user_is_accepted(place: Path) -> None:
    key = signing_key(place, owner=ENTRY.pw_uid)
    with started(place, with_key(place, key)) as daemon:
        assert daemon.process is not None and daemon.process.poll() is None


def test_root_owned_key_readable_by_the_daemons_group_is_accepted(place: Path) -> None:
    key = signing_key(place, owner=0, mode=0o640)
    os.chown(key, 0, ENTRY.pw_gid)
    config = with_key(place, key)
    config["signing"]["allow_group_readable_keys"] = True
    with started(place, config) as daemon:
        assert daemon.process is not None and daemon.process.poll() is None


def test_access_problem_as_root() -> None:
    """Run as root (the `user: root` case): a root key is fine, another user's is not."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "k.pem"
        write_private(generate("ed25519"), str(path))
        assert access_problem(str(path)) is None
        os.chown(path, OTHER.pw_uid, -1)
        assert "belongs to" in (access_problem(str(path)) or "")
        assert "cannot stat" in (access_problem(str(path) + ".missing") or "")


# ---- the DMARC store and the configuration file ------------------------------------------------


def test_store_in_a_world_writable_directory_refuses(place: Path) -> None:
    shared = place / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # sticky, as /tmp: others may still plant the WAL or the journal
    out = refused(place, base_config(place, user=USER, dmarc={"store": f"{shared}/d.db"}))
    assert f"the DMARC store's directory {shared} is writable by everyone" in out, out


def test_store_not_made_yet_is_judged_by_the_closest_directory(place: Path) -> None:
    shared = place / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = refused(place, base_config(place, user=USER,
                                     dmarc={"store": f"sqlite://{shared}/a/b/d.db"}))
    assert f"directory {shared} is writable by everyone" in out, out


def test_world_writable_store_file_refuses(place: Path) -> None:
    state = place / "state"
    state.mkdir(mode=0o750)
    os.chown(state, ENTRY.pw_uid, ENTRY.pw_gid)
    store = state / "d.db"
    store.touch()
    os.chown(store, ENTRY.pw_uid, ENTRY.pw_gid)
    store.chmod(0o666)
    out = refused(place, base_config(place, user=USER, dmarc={"store": str(store)}))
    assert f"the DMARC store file {store} is writable by everyone" in out, out


def test_store_of_the_daemons_user_is_accepted(place: Path) -> None:
    state = place / "state"
    state.mkdir(mode=0o750)
    os.chown(state, ENTRY.pw_uid, ENTRY.pw_gid)
    with started(place, base_config(place, user=USER, dmarc={"store": f"{state}/d.db"})):
        pass
    made = os.stat(state / "d.db")
    assert made.st_uid == ENTRY.pw_uid and not made.st_mode & 0o002


def test_world_writable_configuration_refuses(place: Path) -> None:
    path = place / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(base_config(place, user=USER)))
    path.chmod(0o666)
    done = subprocess.run([sys.executable, "-m", "mailwarden", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert f"the configuration file {path} is writable by everyone" in done.stderr, done.stderr
