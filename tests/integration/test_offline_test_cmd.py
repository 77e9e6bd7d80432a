"""`mailwarden test FILE.eml`: the configured policy on a message file, as the daemon judges it.
DNS from the loopback server; the same messages also go through the running daemon over the
milter protocol, and both must reach the same verdict with the same headers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import Daemon
from milterload import MilterClient

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import generate, load_key, public_record, write_private
from mailwarden.dkim.sign import sign_message

AUTHSERV = "mx.test.example"
GOOD_IP = "192.0.2.1"
BAD_IP = "198.51.100.9"
UNSIGNED = (b"From: Alice <alice@good.example>\r\nTo: bob@ours.example\r\n"
            b"Subject: quarterly report\r\nMessage-ID: <1@good.example>\r\n"
            b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello Bob,\r\nthe numbers.\r\n")


@pytest.fixture(scope="module")
def world(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("offline")
    private = generate("rsa", 2048)
    write_private(private, str(workdir / "good.pem"))
    key = load_key("good.example", "s1", str(workdir / "good.pem"))
    ours = generate("rsa", 2048)
    write_private(ours, str(workdir / "ours.pem"))
    dns_server.load({
        "good.example": [{"TXT": f"v=spf1 ip4:{GOOD_IP} -all"}],
        "_dmarc.good.example": [{"TXT": "v=DMARC1; p=reject"}],
        "s1._domainkey.good.example": [{"TXT": public_record(private)}],
    })
    signature = sign_message(UNSIGNED, [key])[0]
    signed = f"{signature[0]}:{signature[1]}".replace("\n", "\r\n").encode() + b"\r\n" + UNSIGNED
    forged = (f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=good.example\r\n"
              .encode() + signed)
    files = {}
    for name, data in (("signed", signed), ("forged", forged), ("unsigned", UNSIGNED)):
        files[name] = workdir / f"{name}.eml"
        files[name].write_bytes(data)
    config = {
        "listen": f"unix:{workdir}/milter.sock",
        "authserv_id": AUTHSERV,
        "workers": 1,
        "log_level": "info",
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "domains": ["ours.example"],
        "hosts": {"internal": ["10.0.0.0/8"]},
        "signing": {"keys": [{"domain": "ours.example", "selector": "o1",
                              "key": str(workdir / "ours.pem")}]},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "auth"}],
            "rcpt": [{"name": "relay", "check": "rcpt_relay", "allowed_hosts": "internal"}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc", "enforce": True},
                    {"name": "sign", "check": "dkim_sign", "allowed_hosts": "internal"}],
        },
    }
    path = workdir / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    yield {"dir": workdir, "config": config, "path": path, "files": files,
           "dns": f"127.0.0.1:{dns_server.port}"}


def mailwarden_test(world: dict[str, Any], name: str, *extra: str, ip: str = GOOD_IP,
                    sender: str = "alice@good.example", rcpt: str = "bob@ours.example",
                    config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", "test", str(world["files"][name]), "--ip", ip,
         "--helo", "mail.good.example", "--mail-from", sender, "--rcpt", rcpt,
         "--config", str(config or world["path"]), *extra],
        capture_output=True, text=True, timeout=60, check=False)


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_a_legitimate_message_passes_and_shows_every_stage(world: dict[str, Any]) -> None:
    done = mailwarden_test(world, "signed")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("mail     <alice@good.example>", "rule 'spf': spf=pass",
                 "rule 'dkim': dkim=pass", "rule 'dmarc': dmarc=pass",
                 "verdict: CONTINUE (at eom)", "headers added (top of the message):",
                 f"  Authentication-Results: {AUTHSERV};"):
        assert line in out, out
    data = as_json(mailwarden_test(world, "signed", "--json"))
    assert data["verdict"] == "continue" and data["reply"] is None
    assert [s["stage"] for s in data["stages"]] == ["connect", "helo", "mail", "rcpt", "eom"]
    results = {(r["method"], r["result"]) for s in data["stages"] for r in s["results"]}
    assert {("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")} <= results
    (added,) = [h for h in data["headers"]["added"] if h["name"] == "Authentication-Results"]
    assert "dmarc=pass" in added["value"] and "header.from=good.example" in added["value"]


def test_why_was_this_rejected(world: dict[str, Any]) -> None:
    data = as_json(mailwarden_test(world, "unsigned", "--json", ip=BAD_IP))
    assert data["verdict"] == "reject"
    assert data["stage"] == "mail"
    assert data["reply"].startswith("550 5.7.23 ")
    mail = data["stages"][-1]
    assert mail["stage"] == "mail"
    assert ("spf", "fail") in [(r["rule"], r["result"]) for r in mail["results"]]
    text = mailwarden_test(world, "unsigned", ip=BAD_IP).stdout
    assert "verdict: REJECT 550 5.7.23" in text and "(at mail)" in text


def test_dmarc_rejection_at_end_of_message(world: dict[str, Any]) -> None:
    # From good.example, unsigned, from a host its SPF does not list, envelope elsewhere
    data = as_json(mailwarden_test(world, "unsigned", "--json", ip=BAD_IP,
                                   sender="bounce@other.example"))
    assert data["verdict"] == "reject" and data["stage"] == "eom"
    assert data["reply"].startswith("550 5.7.1 ")


def test_relay_attempt_and_signing(world: dict[str, Any]) -> None:
    data = as_json(mailwarden_test(world, "unsigned", "--json", ip=BAD_IP,
                                   sender="x@other.example", rcpt="victim@elsewhere.example"))
    assert data["verdict"] == "reject" and data["stage"] == "rcpt"
    assert data["rcpts_refused"][0]["rcpt"] == "victim@elsewhere.example"
    # from an internal host: mailwarden signs for ours.example
    (world["files"]["unsigned"].parent / "ours.eml").write_bytes(
        UNSIGNED.replace(b"alice@good.example", b"carol@ours.example"))
    world["files"]["ours"] = world["files"]["unsigned"].parent / "ours.eml"
    data = as_json(mailwarden_test(world, "ours", "--json", ip="10.1.2.3",
                                   sender="carol@ours.example", rcpt="dave@far.example"))
    signatures = [h for h in data["headers"]["added"] if h["name"] == "DKIM-Signature"]
    assert len(signatures) == 1 and "d=ours.example" in signatures[0]["value"]


def test_forged_authentication_results_are_shown_as_removed(world: dict[str, Any]) -> None:
    data = as_json(mailwarden_test(world, "forged", "--json"))
    assert data["headers"]["removed"] == [{"name": "Authentication-Results", "index": 1}]


def test_monitor_mode_shows_what_enforcement_would_do(world: dict[str, Any]) -> None:
    monitored = world["dir"] / "monitor.yaml"
    monitored.write_text(yaml.safe_dump({**world["config"], "mode": "monitor"}))
    data = as_json(mailwarden_test(world, "unsigned", "--json", ip=BAD_IP,
                                   config=monitored))
    assert data["verdict"] == "continue"
    assert data["monitored"][0].startswith("reject by rule 'spf' at mail reply=\"550 5.7.23")
    assert any("dmarc" in note for note in data["monitored"])


def test_nameserver_option_overrides_the_configured_servers(world: dict[str, Any]) -> None:
    broken = world["dir"] / "nodns.yaml"
    nodns = {**world["config"], "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.2,
                                        "lifetime": 0.4}}
    broken.write_text(yaml.safe_dump(nodns))
    # the configured server does not answer: a temporary error, never a rejection
    data = as_json(mailwarden_test(world, "signed", "--json", config=broken))
    assert data["verdict"] == "tempfail" and data["reply"].startswith("451 4.7.24")
    data = as_json(mailwarden_test(world, "signed", "--json", "--nameserver", world["dns"],
                                   config=broken))
    assert data["verdict"] == "continue"


def test_bad_config_and_missing_file(world: dict[str, Any]) -> None:
    bad = world["dir"] / "bad.yaml"
    bad.write_text("authserv_id: mx.test.example\nrules:\n  mail:\n    - {name: x, check: spff}\n")
    done = mailwarden_test(world, "signed", config=bad)
    assert done.returncode == 2
    assert f"{bad}:4: rules.mail[0].check: must be one of" in done.stderr
    world["files"]["missing"] = world["dir"] / "missing.eml"
    done = mailwarden_test(world, "missing")
    assert done.returncode == 1 and "cannot read" in done.stderr


@pytest.fixture(scope="module", params=["libmilter", "native"])
def daemon(world: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """The daemon on each transport: both must give what the stage API gives offline."""
    config = {**world["config"], "transport": request.param,
              "listen": f"unix:{world['dir']}/milter-{request.param}.sock"}
    with Daemon(world["dir"] / f"daemon-{request.param}", config) as running:
        yield running


@pytest.mark.parametrize("name, ip, sender, rcpt", [
    ("signed", GOOD_IP, "alice@good.example", "bob@ours.example"),
    ("forged", GOOD_IP, "alice@good.example", "bob@ours.example"),
    ("unsigned", BAD_IP, "alice@good.example", "bob@ours.example"),
    ("unsigned", BAD_IP, "bounce@other.example", "bob@ours.example"),
])
def test_same_verdict_and_headers_as_the_daemon(world: dict[str, Any], daemon: Daemon, name: str,
                                                ip: str, sender: str, rcpt: str) -> None:
    offline = as_json(mailwarden_test(world, name, "--json", ip=ip, sender=sender, rcpt=rcpt))
    with MilterClient(daemon.socket) as client:
        result = client.send_message(client_ip=ip, helo="mail.good.example", mail_from=sender,
                                     rcpts=[rcpt], message=world["files"][name].read_bytes())
    assert result.action == offline["verdict"]
    assert (result.reply or None) == offline["reply"]
    daemon_added = [(n, " ".join(v.split())) for n, v in result.headers_added]
    offline_added = [(h["name"], " ".join(h["value"].split()))
                     for h in offline["headers"]["added"]]
    assert daemon_added == offline_added


def test_rules_that_did_not_run_are_shown_with_why(world: dict[str, Any]) -> None:
    """A rule whose `when:` does not hold, and the rules an earlier `accept` skipped, are
    listed under their stage with the reason (issue 15 #9): before, they were not shown."""
    config = dict(world["config"], rules={
        "mail": [{"name": "internal only", "check": "spf",
                  "when": {"client_in": ["internal"]}},
                 {"name": "trusted sender", "check": "spf",
                  "when": {"not": {"authenticated": True}}, "on": {"pass": "accept"}}],
        "eom": [{"name": "dmarc", "check": "dmarc"}],
    })
    path = world["dir"] / "skipping.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = mailwarden_test(world, "signed", config=path)
    assert done.returncode == 0, done.stderr
    assert ("rule 'internal only': skipped (when: {client_in: [internal]} does not hold)"
            in done.stdout), done.stdout
    assert "rule 'dmarc': skipped (an earlier accept ended the checks)" in done.stdout
    data = as_json(mailwarden_test(world, "signed", "--json", config=path))
    skipped = {s["stage"]: s["skipped"] for s in data["stages"]}
    assert skipped["mail"] == [{"rule": "internal only",
                                "why": "when: {client_in: [internal]} does not hold"}]
    assert skipped["eom"] == [{"rule": "dmarc", "why": "an earlier accept ended the checks"}]
