# Convenience targets; each one runs scripts/setup.sh first (idempotent, fast once set up).
# Run as root on Debian 12.

.PHONY: demo run test

# Postfix + mailwarden + a DNS server on loopback; sends a few messages, prints the outcomes.
demo:
	bash scripts/demo.sh

# The daemon in the foreground on conf/mailwarden.yaml.
run:
	bash scripts/run.sh

# ruff, mypy --strict and the whole test suite.
test:
	bash scripts/test.sh
