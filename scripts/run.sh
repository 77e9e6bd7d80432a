#!/usr/bin/env bash
# Sets up mailwarden (scripts/setup.sh) and runs the milter daemon in the foreground on the
# shipped example configuration, conf/mailwarden.yaml (listening on inet:8894@127.0.0.1,
# embedded defaults, no database server). Stop it with Ctrl-C (or SIGTERM); reload it with
# SIGHUP. Point an MTA at it as the README shows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mailwarden check-config conf/mailwarden.yaml
exec .venv/bin/mailwarden run --config conf/mailwarden.yaml
