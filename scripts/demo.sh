#!/usr/bin/env bash
# Sets up mailwarden with its test tools (scripts/setup.sh --test: Postfix among them) and runs
# the demo: a private Postfix on loopback with mailwarden attached, a loopback DNS server with
# example zones, six messages sent and their SMTP outcomes and delivered headers printed, then
# everything it started is stopped. Needs root (Postfix). See demo/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python demo/demo.py "$@"
