#!/usr/bin/env bash
# Sets up mailwarden with Postfix (scripts/setup.sh --demo) and runs
# the demo: a private Postfix on loopback with mailwarden attached, a loopback DNS server with
# example zones, six messages sent and their SMTP outcomes and delivered headers printed, then
# everything it started is stopped. Needs root (Postfix). See demo/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
exec .venv/bin/python demo/demo.py "$@"
