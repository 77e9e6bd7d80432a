#!/usr/bin/env bash
# Sets up mailwarden (scripts/setup.sh) and runs its main job on the shipped example.
# Until the milter daemon exists, the main job is the `mailwarden spf` command: a loopback DNS
# server serves conf/example-dns.yaml and a few SMTP transactions are evaluated against it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

log=$(mktemp)
.venv/bin/python -m mailwarden.devdns conf/example-dns.yaml --host 127.0.0.1 --port 0 >"$log" 2>&1 &
dns_pid=$!
trap 'kill "$dns_pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 50); do
    grep -q "listening" "$log" && break
    sleep 0.1
done
ns=$(sed -n 's/.*listening on //p' "$log" | head -n1)
[ -n "$ns" ] || { echo "run: the example DNS server did not start:" >&2; cat "$log" >&2; exit 1; }
echo "Example DNS server on $ns (conf/example-dns.yaml)"

spf() {
    echo
    echo "\$ mailwarden spf $*"
    .venv/bin/mailwarden spf --nameserver "$ns" --timeout 1 --receiver mx.example.net "$@"
}
spf --ip 192.0.2.20 --sender alice@example.com --helo mx2.example.com
spf --ip 203.0.113.200 --sender alice@example.com --helo out.mailer.example.net
spf --ip 192.0.2.99 --sender mallory@example.com --helo spoofer.example.org
spf --ip 192.0.2.99 --sender someone@broken.example.org --helo host.example.org
spf --ip 192.0.2.99 --sender someone@slow.example.org --helo host.example.org
spf --ip 192.0.2.20 --sender "" --helo mx2.example.com --json
