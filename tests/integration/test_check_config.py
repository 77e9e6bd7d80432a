"""`check-config` refuses what `run` would refuse (issue 15 #4): under systemd a start that
fails is a restart every few seconds, so the check made before must find the same problems --
a user or group that does not exist, a signing key the daemon's user cannot read, a store it
cannot open -- checked as that user, and exit 1. Before, it said OK to each of these."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailwarden.dkim.keys import generate, write_private

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checks as another user need root")


@pytest.fixture
def place() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mailwarden-check-"))  # the daemon's user can reach it
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def check(place: Path, **settings: object) -> tuple[int, dict[str, object], str]:
    config = place / "mailwarden.yaml"
    config.write_text(yaml.safe_dump({"authserv_id": "mx.example.net", "user": "mailwarden",
                                      **settings}))
    config.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "mailwarden", "check-config", str(config),
                           "--json"], capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def test_a_sound_configuration_passes(place: Path) -> None:
    store = place / "state"
    store.mkdir()
    shutil.chown(store, "mailwarden", "mailwarden")
    code, result, err = check(place, dmarc={"store": str(store / "dmarc.db")})
    assert code == 0, (result, err)
    assert result["problems"] == []
    assert (store / "dmarc.db").stat().st_uid == Path(store).stat().st_uid  # made as the user


@pytest.mark.parametrize(("settings", "said"), [
    ({"user": "no-such-user-here"}, "user 'no-such-user-here' does not exist"),
    ({"group": "no-such-group-here"}, "group 'no-such-group-here' does not exist"),
    ({"listen": "unix:/tmp/x.sock", "socket_group": "no-such-group-here"},
     "group 'no-such-group-here' does not exist"),
])
def test_who_the_daemon_runs_as_must_exist(place: Path, settings: dict[str, object],
                                           said: str) -> None:
    code, result, _ = check(place, **settings)
    assert code == 1
    assert any(said in problem for problem in result["problems"]), result["problems"]


def test_a_key_the_daemons_user_cannot_read(place: Path) -> None:
    key = place / "private.pem"
    write_private(generate("ed25519"), str(key))  # root's, mode 0600
    code, result, _ = check(place, signing={"keys": [
        {"domain": "example.net", "selector": "s1", "key": str(key)}]})
    assert code == 1
    assert any(str(key) in problem for problem in result["problems"]), result["problems"]


def test_a_store_the_daemons_user_cannot_create(place: Path) -> None:
    locked = place / "root-only"
    locked.mkdir(mode=0o700)
    code, result, _ = check(place, dmarc={"store": str(locked / "dmarc.db")})
    assert code == 1
    assert any("DMARC store" in problem for problem in result["problems"]), result["problems"]
    assert not (locked / "dmarc.db").exists()
