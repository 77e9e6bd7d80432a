"""mailwarden: a mail-authentication milter (SPF, DKIM, DMARC, ARC, relay policy)."""

__version__ = "0.1.0"
