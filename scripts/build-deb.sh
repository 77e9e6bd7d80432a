#!/usr/bin/env bash
# Builds the Debian package: dist/mailwarden_VERSION-1_ARCH.deb (or --out DIR). Run as root on
# Debian 12; it installs its build dependencies (a compiler and libmilter's headers: pymilter is
# compiled here, so that the machines installing the package need neither).
#
# Layout of the package:
#   /usr/bin/mailwarden                 Debian's python3, isolated (-I), on the modules below
#   /usr/lib/mailwarden/                mailwarden and its Python dependencies (pip --target)
#   /etc/mailwarden/mailwarden.yaml     conffile: conf/mailwarden.yaml
#   /lib/systemd/system/                the units, pointing at /usr/bin/mailwarden
#   /usr/share/man/man8/mailwarden.8.gz, man5/mailwarden.yaml.5.gz (generated)
#   /usr/share/doc/mailwarden/          copyright, changelog, README, docs, examples
# The maintainer scripts create the `mailwarden` system user and /var/lib/mailwarden, enable and
# start the daemon under systemd, and remove /var/lib/mailwarden on purge.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
    esac
done

BUILD_DEPS=(gcc python3 python3-dev python3-venv libmilter-dev)
. scripts/lib/apt.sh
mapfile -t missing < <(missing_packages "${BUILD_DEPS[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-deb: installing build dependencies: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

PYTHON=/usr/bin/python3  # the interpreter the package runs on: its ABI for compiled modules
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ARCH=$(dpkg --print-architecture)
PYMINOR=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
NEXT=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
DEB="mailwarden_${VERSION}-1_${ARCH}.deb"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/root"
LIB="$STAGE/usr/lib/mailwarden"

echo "build-deb: mailwarden $VERSION for $ARCH, Python $PYMINOR"
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q --upgrade pip >/dev/null
# the package and its dependencies, compiled to bytecode here (the .pyc files are part of the
# package, so nothing is written under /usr/lib at run time and a purge leaves nothing)
"$WORK/build-env/bin/pip" install -q --target "$LIB" .
rm -rf "$LIB/bin"

install -d "$STAGE/usr/bin"
cat > "$STAGE/usr/bin/mailwarden" <<'EOF'
#!/usr/bin/python3 -I
# mailwarden, installed by its Debian package: its modules are in /usr/lib/mailwarden.
import sys

sys.dont_write_bytecode = True  # the package ships its bytecode; /usr/lib stays as installed
sys.path.insert(0, "/usr/lib/mailwarden")
from mailwarden.cli import main  # noqa: E402

sys.exit(main())
EOF
chmod 0755 "$STAGE/usr/bin/mailwarden"

install -d -m 0755 "$STAGE/etc/mailwarden"
install -m 0640 conf/mailwarden.yaml "$STAGE/etc/mailwarden/mailwarden.yaml"

install -d "$STAGE/lib/systemd/system"
for unit in systemd/*.service systemd/*.timer; do
    install -m 0644 "$unit" "$STAGE/lib/systemd/system/"
done
if grep -q "^ExecStart=/opt" "$STAGE"/lib/systemd/system/*.service; then
    echo "build-deb: a unit points into /opt, not at /usr/bin/mailwarden" >&2
    exit 1
fi

install -d "$STAGE/usr/share/man/man8" "$STAGE/usr/share/man/man5"
"$PYTHON" -I -c 'import sys; sys.path.insert(0, sys.argv[1]); from mailwarden.devtools.manpages import main; sys.exit(main([sys.argv[2], "--configuration", sys.argv[3]]))' \
    "$LIB" "$WORK/man" docs/configuration.md
gzip -9n < "$WORK/man/mailwarden.8" > "$STAGE/usr/share/man/man8/mailwarden.8.gz"
gzip -9n < "$WORK/man/mailwarden.yaml.5" > "$STAGE/usr/share/man/man5/mailwarden.yaml.5.gz"

DOC="$STAGE/usr/share/doc/mailwarden"
install -d "$DOC/examples"
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: mailwarden"
    echo
    echo "Files: *"
    echo "License: BSD-2-Clause"
    echo
    echo "License: BSD-2-Clause"
    sed -e 's/^$/./' -e 's/^/ /' LICENSE
} > "$DOC/copyright"
gzip -9n < CHANGELOG.md > "$DOC/changelog.gz"
install -m 0644 README.md "$DOC/"
cp -r docs "$DOC/docs"
cp -r conf/fail2ban "$DOC/examples/fail2ban"
install -m 0644 conf/mailwarden.yaml "$DOC/examples/"

install -d "$STAGE/DEBIAN"
echo /etc/mailwarden/mailwarden.yaml > "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: mailwarden
Version: ${VERSION}-1
Architecture: ${ARCH}
Maintainer: mailwarden developers <postmaster@localhost>
Installed-Size: ${SIZE}
Depends: python3 (>= ${PYMINOR}), python3 (<< ${NEXT}), libmilter1.0.1, passwd
Recommends: postfix | mail-transport-agent
Suggests: rsyslog, fail2ban
Section: mail
Priority: optional
Homepage: https://localhost/mailwarden
Description: mail-authentication milter: SPF, DKIM, DMARC, ARC and relay policy
 A milter for Postfix and Sendmail that replaces OpenDKIM, OpenDMARC and an SPF
 policy daemon: SPF (RFC 7208), DKIM verification and signing, DMARC (RFC 9989)
 with aggregate reports, ARC, relay checks, Authentication-Results, and replies
 with RFC 3463/7372 enhanced status codes.
EOF

cat > "$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd mailwarden >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin mailwarden
    fi
    install -d -o mailwarden -g mailwarden -m 0750 /var/lib/mailwarden
    # read by the daemon after it drops to its user (a reload re-reads it), written by root
    chown root:mailwarden /etc/mailwarden/mailwarden.yaml
    chmod 0640 /etc/mailwarden/mailwarden.yaml
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        deb-systemd-helper enable mailwarden.service >/dev/null || true
        deb-systemd-invoke restart mailwarden.service >/dev/null || true
    fi
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop mailwarden.service mailwarden-dmarc-report.timer mailwarden-dmarc-failures.timer >/dev/null || true
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # the DMARC store and report lock; keys and files an administrator put in /etc/mailwarden
    # stay (the conffile itself is removed by dpkg). The system user stays too: files it owned
    # elsewhere keep a name (Debian Policy 9.2.2).
    rm -rf /var/lib/mailwarden
    rmdir --ignore-fail-on-non-empty /etc/mailwarden 2>/dev/null || true
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge mailwarden.service mailwarden-dmarc-report.timer mailwarden-dmarc-failures.timer \
            >/dev/null || true
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$OUT/$DEB" >/dev/null
echo "build-deb: $OUT/$DEB ($(du -h "$OUT/$DEB" | cut -f1))"
