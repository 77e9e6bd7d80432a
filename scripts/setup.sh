#!/usr/bin/env bash
# Installs what mailwarden needs to run from this checkout on a fresh Debian machine (run as
# root): Debian packages (a compiler and libmilter's headers among them: pymilter is built from
# source; the Debian package, scripts/build-deb.sh, needs neither), the `mailwarden` system user
# the example config drops to, and a virtualenv in .venv with the package.
#   --demo  also Postfix, for the demo (scripts/demo.sh)
#   --test  also the development tools (ruff, mypy, pytest) and everything the test suite
#           drives: Postfix (configured by nothing: the tests run private instances),
#           miltertest, OpenDKIM, OpenDMARC, PostgreSQL, rsyslog, Fail2Ban, Sendmail
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${1:-}
case "$PROFILE" in
    ""|--demo|--test) ;;
    *) echo "usage: $0 [--demo|--test]" >&2; exit 2 ;;
esac
APT_PACKAGES=(gcc python3 python3-dev python3-venv libmilter-dev)
if [ "$PROFILE" = "--demo" ]; then
    APT_PACKAGES+=(postfix)
fi
if [ "$PROFILE" = "--test" ]; then
    APT_PACKAGES+=(postfix miltertest opendkim opendkim-tools opendmarc dbconfig-no-thanks
                   libxml2-utils postgresql
                   # the log path an administrator has: rsyslog files the mail facility,
                   # Fail2Ban's tools check the shipped filter and jail (tests/integration/
                   # test_logging.py; neither daemon is started)
                   rsyslog fail2ban
                   # a private Sendmail (unpacked below, not installed: it conflicts with
                   # postfix): m4 builds its sendmail.cf, and the libraries it links
                   m4 libdb5.3 liblockfile1 libnsl2 libsasl2-2 libldap-2.5-0 libssl3)
fi

. scripts/lib/apt.sh
mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix asks how to configure the system's own instance: leave it unconfigured.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Install daemons (postfix, opendkim) without starting the system's own instances: the
    # tests run private ones.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
        # removed however apt ends: left behind, it would keep every later service from
        # starting on this machine
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f "$policy"
    trap - EXIT
fi

# Sendmail 8.17 for the tests: Debian's sendmail-bin conflicts with postfix, so its packages
# are downloaded and unpacked into .cache/sendmail/root (tests/integration/sendmail.py).
SENDMAIL=.cache/sendmail
if [ "$PROFILE" = "--test" ] && [ ! -x "$SENDMAIL/root/usr/libexec/sendmail/sendmail" ]; then
    echo "setup: unpacking Sendmail into $SENDMAIL for the tests"
    rm -rf "$SENDMAIL" && mkdir -p "$SENDMAIL/debs"
    fetch() { (cd "$SENDMAIL/debs" && apt-get download -qq sendmail-bin sendmail-cf libwrap0) \
        2>/dev/null; }
    fetch || { apt-get update -qq && fetch; }
    for deb in "$SENDMAIL"/debs/*.deb; do dpkg-deb -x "$deb" "$SENDMAIL/root"; done
    # setgid would make ld.so ignore LD_LIBRARY_PATH (the unpacked libwrap)
    chmod g-s "$SENDMAIL/root/usr/libexec/sendmail/sendmail"
fi

if ! getent passwd mailwarden >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mailwarden
fi
# The DMARC report store of the example configuration (SQLite), writable by the daemon only.
install -d -o mailwarden -g mailwarden -m 0750 /var/lib/mailwarden

# Debian's own Python: world-readable, so the daemon still finds its modules after it drops
# privileges (a Python under /root would not be readable by the `mailwarden` user).
PYTHON=${PYTHON:-/usr/bin/python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PYTHON is older than Python 3.11" >&2
    exit 1
fi
base_of() { "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'; }
if [ -x .venv/bin/python ] && [ "$(base_of .venv/bin/python)" != "$(base_of "$PYTHON")" ]; then
    rm -rf .venv  # made from another Python
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# the development tools only for the tests: running the daemon needs none of them
extras=""
[ "$PROFILE" = "--test" ] && extras="[dev]"
stamp=".venv/.mailwarden-installed"
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
installed=$(cat "$stamp" 2>/dev/null || true)
# a virtualenv set up for the tests serves the other profiles too
if [ "$installed" != "$hash$extras" ] && [ "$installed" != "$hash[dev]" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".$extras"
    echo "$hash$extras" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/mailwarden --version))"
