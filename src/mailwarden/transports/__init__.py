"""Transports: what turns an MTA's milter conversation into calls of the stage API
(`mailwarden.stage`) and Decisions back into replies and header edits.

- `libmilter`: a pymilter `Milter.Base` subclass over Sendmail's libmilter, the reference
  implementation every MTA is tested against (the default).
- `native`: our own implementation of the milter protocol (`milterproto`, `server`).
"""
