"""DMARC (RFC 9989) evaluation and aggregate reporting (RFC 9990)."""
