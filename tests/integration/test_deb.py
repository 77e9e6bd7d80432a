"""The Debian package (scripts/build-deb.sh), built and installed into a clean root: this
machine's root seen through an overlay in a private mount namespace (so nothing here changes),
with mailwarden's user, state, configuration and the checkout itself removed from it. dpkg
installs the package there; the daemon is started with the command line of the installed
systemd unit, mail goes to it through a real Postfix, and a purge leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from postfix import PostfixInstance, free_port, postfix_available

from mailwarden.devtools.devdns import DevDNSServer, load_zone_file

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg, mounts and Postfix need root"),
    pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed "
                       "(scripts/setup.sh --test)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing"),
]

# Runs as `unshare --mount --fork bash -c SCRIPT`: everything mounted here vanishes with it.
SCRIPT = r"""
set -euo pipefail
W=$1 DEB=$2 PORT=$3 DNS=$4 SHARED=$5 CHECKOUT=$6
mount -t tmpfs tmpfs "$W"
mkdir -p "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$W/root"
R=$W/root
mount --rbind /proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
# no checkout, no virtualenv (one under /tmp is hidden by the tmpfs already)
if [ -d "$R$CHECKOUT" ]; then mount -t tmpfs tmpfs "$R$CHECKOUT"; fi
cp "$DEB" "$R/tmp/"
in_root() { chroot "$R" "$@"; }
# a clean root for mailwarden: no user, no state, no configuration, no installed copy
in_root sh -c 'userdel mailwarden 2>/dev/null || true; groupdel mailwarden 2>/dev/null || true
               rm -rf /var/lib/mailwarden /etc/mailwarden /usr/lib/mailwarden /usr/bin/mailwarden'
in_root dpkg -i "/tmp/$(basename "$DEB")" > $SHARED/dpkg-install.log 2>&1
in_root sh -c 'stat -c "%U:%G %a %n" /var/lib/mailwarden /etc/mailwarden/mailwarden.yaml;
               id -u mailwarden; command -v mailwarden; mailwarden --version;
               gzip -t /usr/share/man/man8/mailwarden.8.gz /usr/share/man/man5/mailwarden.yaml.5.gz
              ' > $SHARED/installed.txt 2>&1
# what an administrator edits: the port, the resolver, the internal network
in_root /usr/bin/python3 -I - "$PORT" "$DNS" <<'EOF'
import sys
sys.path.insert(0, "/usr/lib/mailwarden")
import yaml
path = "/etc/mailwarden/mailwarden.yaml"
config = yaml.safe_load(open(path))
config["listen"] = f"inet:{sys.argv[1]}@127.0.0.1"
config.setdefault("dns", {})["nameservers"] = [sys.argv[2]]
config["hosts"]["internal"] = ["192.168.1.0/24"]
open(path, "w").write(yaml.safe_dump(config, sort_keys=False))
EOF
in_root mailwarden check-config --config /etc/mailwarden/mailwarden.yaml \
    > $SHARED/check-config.txt 2>&1 || { echo "check-config failed" >> $SHARED/check-config.txt; }
EXEC=$(sed -n 's/^ExecStart=//p' "$R/lib/systemd/system/mailwarden.service")
echo "$EXEC" > $SHARED/execstart.txt
chroot "$R" $EXEC > $SHARED/daemon.log 2>&1 &
echo $! > $SHARED/daemon.pid
wait $! || true
in_root dpkg --purge mailwarden > $SHARED/dpkg-purge.log 2>&1
in_root sh -c 'for p in /usr/bin/mailwarden /usr/lib/mailwarden /etc/mailwarden \
                        /var/lib/mailwarden /lib/systemd/system/mailwarden.service \
                        /usr/share/man/man8/mailwarden.8.gz /usr/share/doc/mailwarden; do
                   [ -e "$p" ] && echo "left: $p"; done; true' \
    > $SHARED/purged.txt
echo done > $SHARED/finished
"""


def wait_for(path: Path, timeout: float, what: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        if process.poll() is not None:
            raise AssertionError(f"{what}: the root's script ended ({process.returncode}): "
                                 + (process.stdout.read() if process.stdout else b"").decode())
        time.sleep(0.1)
    raise AssertionError(f"{what}: {path} did not appear")


def test_the_package_installs_runs_through_postfix_and_purges(
        dns_server: DevDNSServer, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run(["bash", "scripts/build-deb.sh", "--out", str(dist)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    (deb,) = dist.glob("mailwarden_*.deb")
    dns_server.load(load_zone_file(ROOT / "conf" / "example-dns.yaml"))
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "w").mkdir()
    port = free_port()
    root = subprocess.Popen(
        ["unshare", "--mount", "--fork", "bash", "-c", SCRIPT, "root", str(tmp_path / "w"),
         str(deb), str(port), f"127.0.0.1:{dns_server.port}", str(shared), str(ROOT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    mx = PostfixInstance(tmp_path / "postfix", milter=f"inet:127.0.0.1:{port}")
    try:
        pid = int(wait_for(shared / "daemon.pid", 180, "the daemon's start", root))
        log = shared / "daemon.log"
        deadline = time.monotonic() + 30
        while "started" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)
        installed = (shared / "installed.txt").read_text()
        assert "mailwarden:mailwarden 750 /var/lib/mailwarden" in installed, installed
        assert "root:mailwarden 640 /etc/mailwarden/mailwarden.yaml" in installed, installed
        assert "/usr/bin/mailwarden" in installed and "mailwarden 0.1.0" in installed, installed
        assert (shared / "execstart.txt").read_text().split() == [
            "/usr/bin/mailwarden", "run", "--config", "/etc/mailwarden/mailwarden.yaml"]
        checked = (shared / "check-config.txt").read_text()
        assert "OK: mailwarden run would start" in checked, checked
        assert "running as mailwarden:mailwarden" in log.read_text()

        mx.start()
        with smtplib.SMTP("127.0.0.1", mx.smtp_port, source_address=("127.0.0.9", 0),
                          timeout=60) as smtp:
            smtp.ehlo("mx.bulk.example")
            code, text = smtp.mail("bounce@bulk.example")
        assert (code, text[:6]) == (550, b"5.7.23"), (code, text)
        deadline = time.monotonic() + 10
        while "verdict=reject rule=spf check=spf" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.kill(pid, signal.SIGTERM)
        wait_for(shared / "finished", 120, "the purge", root)
        assert (shared / "purged.txt").read_text() == "", (shared / "purged.txt").read_text()
        assert "stopped" in log.read_text()
    finally:
        mx.stop()
        if root.poll() is None:
            os.killpg(root.pid, signal.SIGTERM)
        out = root.communicate(timeout=60)[0].decode(errors="replace")
        print(textwrap.indent(out[-3000:], "  "))
    assert root.returncode == 0, out[-3000:]
