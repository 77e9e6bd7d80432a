"""DKIM keys: loading the key table, generating keys, the DNS record (RFC 6376 §3.6.1) and
checking a published record against a private key."""

from __future__ import annotations

import base64
import contextlib
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailwarden.dns import DNSClient, Status

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One entry of the key table, loaded: what dkimpy signs with, and its public record."""

    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    path: str
    private: bytes = b""  # PEM for RSA; base64 of the 32-octet seed for Ed25519 (dkimpy's form)
    public_record: str = ""  # v=DKIM1; k=...; p=...
    bits: int = 0
    staged: bool = False  # loaded and checked (and `check-dns --all`), never used to sign

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


class KeyError_(ValueError):
    """A key file that cannot be used, with the reason."""


def load_key(domain: str, selector: str, path: str, algorithm: str | None = None, *,
             allow_group_readable: bool = False) -> SigningKey:
    """Load and check a private key file (PEM, RSA or Ed25519). Raises KeyError_."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise KeyError_(f"cannot read key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyError_(f"key {path} is not a regular file")
    if info.st_mode & 0o044 and not allow_group_readable:
        raise KeyError_(f"key {path} is readable by group or others (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it, or set "
                        f"allow_group_readable_keys")
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyError_(f"key {path} is not a usable PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        found = "rsa-sha256"
        if key.key_size < 1024:
            raise KeyError_(f"key {path} has {key.key_size} bits; RFC 8301 §3.2 requires 1024+")
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        signing = SigningKey(domain, selector, found, path, pem, public_record(key),
                             key.key_size)
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        found = "ed25519-sha256"
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        signing = SigningKey(domain, selector, found, path, base64.b64encode(seed),
                             public_record(key), 256)
    else:
        raise KeyError_(f"key {path} is neither RSA nor Ed25519")
    if algorithm is not None and algorithm != found:
        raise KeyError_(f"key {path} is {found}, not {algorithm}")
    return signing


def access_problem(path: str) -> str | None:
    """Why the running process (the daemon, once it has dropped root) should not use the key
    file at `path`, or None. Checked at startup: the key must be owned by root or by us, not
    writable by group or others, in a directory others cannot write to, and readable by us: a
    key only root can read was loaded at the start but would fail every reload."""
    me = os.geteuid()
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot stat it as {_user_name(me)}: {exc.strerror}"
    mode = stat.S_IMODE(info.st_mode)
    described = (f"owner {_user_name(info.st_uid)}, group {_group_name(info.st_gid)}, "
                 f"mode {mode:04o}")
    if info.st_uid not in (0, me):
        return (f"it belongs to {_user_name(info.st_uid)}, neither root nor "
                f"{_user_name(me)} ({described}): that user could replace the key; "
                f"chown root or {_user_name(me)}")
    if mode & 0o022:
        return f"it is writable by group or others ({described}): chmod 600"
    parent = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(OSError):
        if os.stat(parent).st_mode & stat.S_IWOTH:
            return f"its directory {parent} is writable by everyone"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return (f"{_user_name(me)} cannot read it ({exc.strerror}; {described}): it would "
                f"fail at the next reload; chown {_user_name(me)} it, or chgrp "
                f"{_group_name(os.getegid())} and chmod 640 it with "
                f"signing.allow_group_readable_keys")
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def public_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The TXT record text (RFC 6376 §3.6.1; RFC 8463 §4 for Ed25519)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def generate(kind: str, bits: int = 2048) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if kind == "rsa":
        if bits < 1024:
            raise ValueError("RSA keys under 1024 bits never verify (RFC 8301 §3.2)")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {kind!r}")


def write_private(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, path: str,
                  owner: tuple[int, int] | None = None) -> None:
    """Write the key as PEM, created with mode 0600 (never world-readable, not even briefly),
    given to `owner` (uid, gid) before a byte of it is written."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if owner is not None:
        os.fchown(fd, *owner)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def zone_record(name: str, text: str) -> str:
    """A zone-file line with the record split into character-strings of at most 255 octets
    (RFC 1035 §3.3; RFC 6376 §3.6.2.2 says they are concatenated)."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{name}. IN TXT ( {quoted} )"


@dataclass(frozen=True, slots=True)
class DNSCheck:
    ok: bool
    message: str
    temporary: bool = False  # the lookup failed for now: no answer either way


def check_dns(dns: DNSClient, key: SigningKey) -> DNSCheck:
    """Does the published record at selector._domainkey.domain match the private key?"""
    answer = dns.txt(key.dns_name)
    if answer.status is Status.TEMPERROR:
        return DNSCheck(False, f"DNS error for {key.dns_name}: {answer.error}", True)
    if not answer.ok:
        return DNSCheck(False, f"no TXT record at {key.dns_name} ({answer.status})")
    if len(answer.records) > 1:
        return DNSCheck(False, f"{len(answer.records)} TXT records at {key.dns_name}; "
                               "publish exactly one")
    published = answer.records[0]
    try:
        tags = dkim.util.parse_tag_value(published.encode("latin-1"))
    except dkim.util.InvalidTagValueList as exc:
        return DNSCheck(False, f"the record at {key.dns_name} is malformed: {exc}")
    expected = dkim.util.parse_tag_value(key.public_record.encode())
    if not tags.get(b"p"):
        return DNSCheck(False, f"the record at {key.dns_name} has an empty p=: the key is "
                               "revoked")
    kind = tags.get(b"k", b"rsa")
    if kind != expected[b"k"]:
        return DNSCheck(False, f"k={kind.decode()} published, the key is "
                               f"{expected[b'k'].decode()}")
    published_key = b"".join(tags[b"p"].split())
    if published_key != expected[b"p"]:
        return DNSCheck(False, f"the public key at {key.dns_name} does not match {key.path}")
    return DNSCheck(True, f"{key.dns_name} publishes the public key of {key.path}")
