"""Self-test of the OpenDKIM harness (opendkim.py) and of benchmarks/milterload.py's MilterClient:
a real OpenDKIM signs through the milter protocol with RSA and Ed25519 keys published in devdns,
dkimpy verifies what it added, and OpenDKIM verifies dkimpy's signatures through devdns."""

from __future__ import annotations

import base64
import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from milterload import MilterClient, MilterResult, make_message
from opendkim import OpenDKIM, dkim_txt_record, opendkim_available

from mailwarden.devtools.devdns import DevDNSServer

pytestmark = pytest.mark.skipif(
    not opendkim_available(),
    reason="OpenDKIM is not installed (/usr/sbin/opendkim; Debian package 'opendkim')",
)

DOMAIN = "example.org"
INTERNAL = "127.0.0.1"  # in the harness's default InternalHosts: OpenDKIM signs
EXTERNAL = "192.0.2.1"  # not internal, no {auth_type}: OpenDKIM verifies


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """selector -> private key PEM file: "rsa" (2048-bit, PKCS#1) and "ed" (Ed25519, PKCS#8)."""
    tmp = tmp_path_factory.mktemp("dkim-keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    pems = {
        "rsa": rsa_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()),
        "ed": ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()),
    }
    paths = {}
    for selector, pem in pems.items():
        path = tmp / f"{selector}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
        paths[selector] = path
    return paths


@pytest.fixture(scope="module")
def dns_zone(keys: dict[str, Path]) -> Iterator[DevDNSServer]:
    zone = {f"{sel}._domainkey.{DOMAIN}": [{"TXT": dkim_txt_record(path.read_bytes())}]
            for sel, path in keys.items()}
    with DevDNSServer(zone, host="127.0.0.1", port=0) as server:
        yield server


def dnsfunc_for(server: DevDNSServer) -> Callable[..., bytes]:
    """A dkimpy dnsfunc that asks the devdns server (the same one OpenDKIM uses)."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        response = dns.query.udp(query, server.host, port=server.port, timeout=timeout)
        for rrset in response.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return b""

    return dnsfunc


def sign(odk: OpenDKIM, message: bytes) -> MilterResult:
    with MilterClient(odk.socket, timeout=10) as client:
        return client.send_message(client_ip=INTERNAL, helo="client.example.org",
                                   mail_from=f"alice@{DOMAIN}", rcpts=["bob@example.net"],
                                   message=message)


def test_rsa_and_ed25519_signatures_verify_with_dkimpy(
    tmp_path: Path, keys: dict[str, Path], dns_zone: DevDNSServer
) -> None:
    message = make_message(4096, from_addr=f"alice@{DOMAIN}")
    signed = message
    dns_addr = (dns_zone.host, dns_zone.port)
    # one SignatureAlgorithm per OpenDKIM process: chain an RSA and an Ed25519 signer, as
    # Postfix would with smtpd_milters = rsa, ed
    for selector, algorithm in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
        with OpenDKIM(tmp_path / selector, mode="s", dns=dns_addr,
                      keys=[(DOMAIN, selector, keys[selector])]) as odk:
            assert odk.pid is not None and odk.socket.startswith("unix:")
            result = sign(odk, signed)
            assert result.action == "accept", (result, odk.diagnostics())
            assert result.stage == "eom"
            names = [name for name, _ in result.headers_added]
            assert names == ["DKIM-Signature"], (result, odk.diagnostics())
            value = result.headers_added[0][1]
            assert f"a={algorithm};" in value and f"s={selector};" in value
            assert f"d={DOMAIN};" in value
            assert ("i", 0, "DKIM-Signature", value) in result.modifications  # SMFIR_INSHEADER
            signed = result.apply(signed)
            if odk.log_text():  # log capture needs root and unshare(1)
                assert odk.wait_for_log(rf"DKIM-Signature field added \(s={selector}, d={DOMAIN}")
    assert signed.startswith(b"DKIM-Signature:")  # the Ed25519 one, inserted last at the top
    verifier = dkim.DKIM(signed)
    dnsfunc = dnsfunc_for(dns_zone)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc), "Ed25519 signature from OpenDKIM"
    assert verifier.verify(idx=1, dnsfunc=dnsfunc), "RSA signature from OpenDKIM"
    tampered = signed.replace(b"quick brown fox", b"quick brown cat", 1)
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(idx=1, dnsfunc=dnsfunc)


def test_opendkim_verifies_dkimpy_signatures_through_devdns(
    tmp_path: Path, keys: dict[str, Path], dns_zone: DevDNSServer
) -> None:
    message = make_message(2048, from_addr=f"alice@{DOMAIN}")
    raw_ed = serialization.load_pem_private_key(keys["ed"].read_bytes(), password=None)
    assert isinstance(raw_ed, ed25519.Ed25519PrivateKey)
    ed_seed = base64.b64encode(raw_ed.private_bytes(serialization.Encoding.Raw,
                                                    serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption()))
    rsa_sig = dkim.sign(message, b"rsa", DOMAIN.encode(), keys["rsa"].read_bytes(),
                        canonicalize=(b"relaxed", b"relaxed"))
    ed_sig = dkim.sign(message, b"ed", DOMAIN.encode(), ed_seed,
                       signature_algorithm=b"ed25519-sha256",
                       canonicalize=(b"relaxed", b"relaxed"))
    dns_zone.clear_log()
    with OpenDKIM(tmp_path / "verify", mode="v", dns=(dns_zone.host, dns_zone.port)) as odk, \
            MilterClient(odk.socket, timeout=10) as client:
        for selector, signature, algorithm in (("rsa", rsa_sig, "rsa-sha256"),
                                                ("ed", ed_sig, "ed25519-sha256")):
            for body_ok in (True, False):
                data = signature + message
                if not body_ok:
                    data = data.replace(b"lazy dog", b"lazy cat", 1)
                result = client.send_message(client_ip=EXTERNAL, helo="mail.example.org",
                                             mail_from=f"alice@{DOMAIN}",
                                             rcpts=["bob@example.net"], message=data)
                assert result.action == "accept", result
                [(name, value)] = result.headers_added
                assert name == "Authentication-Results"
                assert value.lstrip().startswith("mx.test.example;")  # authserv-id = macro j
                verdict = "dkim=pass" if body_ok else "dkim=fail"
                assert verdict in value, (value, odk.diagnostics())
                assert f"header.d={DOMAIN}" in value and f"header.s={selector}" in value
                assert f"header.a={algorithm}" in value
    asked = {name for name, rdtype, _ in dns_zone.queries if rdtype == "TXT"}
    assert {f"rsa._domainkey.{DOMAIN}", f"ed._domainkey.{DOMAIN}"} <= asked


def test_runs_as_opendkim_user_on_inet_socket(
    tmp_path: Path, keys: dict[str, Path], dns_zone: DevDNSServer
) -> None:
    if os.geteuid() != 0:
        pytest.skip("UserID needs root")
    try:
        uid = pwd.getpwnam("opendkim").pw_uid
    except KeyError:
        pytest.skip("no 'opendkim' user (Debian's opendkim package creates it)")
    with OpenDKIM(tmp_path / "user", mode="sv", keys=[(DOMAIN, "rsa", keys["rsa"])],
                  dns=(dns_zone.host, dns_zone.port), socket="inet", user="opendkim") as odk:
        assert odk.socket.startswith("inet:") and odk.socket.endswith("@127.0.0.1")
        port = odk.socket[5:].partition("@")[0]
        assert odk.postfix_socket == f"inet:127.0.0.1:{port}"
        status = Path(f"/proc/{odk.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(uid)] * 4  # real, effective, saved, fs
        message = make_message(1024, from_addr=f"alice@{DOMAIN}")
        result = sign(odk, message)
        assert [n for n, _ in result.headers_added] == ["DKIM-Signature"], odk.diagnostics()
        assert dkim.verify(result.apply(message), dnsfunc=dnsfunc_for(dns_zone))


def test_refuses_mixed_key_types(tmp_path: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="one SignatureAlgorithm"):
        OpenDKIM(tmp_path / "mixed", mode="s", dns=("127.0.0.1", 53),
                 keys=[(DOMAIN, "rsa", keys["rsa"]), (DOMAIN, "ed", keys["ed"])])


def test_test_mode_signs_offline(tmp_path: Path, keys: dict[str, Path],
                                 dns_zone: DevDNSServer) -> None:
    message = make_message(1024, from_addr=f"alice@{DOMAIN}")
    odk = OpenDKIM(tmp_path / "testmode", mode="sv", keys=[(DOMAIN, "ed", keys["ed"])],
                   dns=(dns_zone.host, dns_zone.port))
    outcome = odk.test_mode(message)
    assert outcome.returncode == 0, outcome.output
    [signature] = outcome.signatures
    assert "a=ed25519-sha256;" in signature
    signed = b"DKIM-Signature: " + signature.replace("\n", "\r\n").encode() + b"\r\n" + message
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(dns_zone))
