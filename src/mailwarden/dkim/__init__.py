"""DKIM (RFC 6376, RFC 8301, RFC 8463) on dkimpy, with RSA through `cryptography`."""

from mailwarden.dkim import fastrsa

fastrsa.install()
