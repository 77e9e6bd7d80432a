"""The YAML configuration (`mailwarden.config`): the shipped example loads, every error is located
(file, line, key path), and the `mailwarden check-config` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mailwarden.checks import CHECKS
from mailwarden.config import ConfigError, Outcome, Section
from mailwarden.config.build import load, parse, parse_listen, parse_status
from mailwarden.dns import Nameserver

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "conf" / "mailwarden.yaml"
FILE = "test.yaml"
BASE = "authserv_id: mx.example.com\n"


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the `occurrence`-th line containing `needle`."""
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} not in the text")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, FILE)
    exc = info.value
    # every error is located: the file always, and the text of the exception says it all
    assert exc.file == FILE
    assert str(exc).startswith(f"{FILE}:{exc.line}: " if exc.line else f"{FILE}: ")
    if exc.key:
        assert f": {exc.key}: " in str(exc)
    return exc


def spf_rule(extra: str = "", stage: str = "mail") -> str:
    """A config with one spf rule at `stage`; `extra` is indented under the rule."""
    body = textwrap.indent(textwrap.dedent(extra).strip("\n"), " " * 6)
    return BASE + f"rules:\n  {stage}:\n    - name: a\n      check: spf\n" + (
        body + "\n" if body else "")


# -- the shipped example ---------------------------------------------------------------------
def test_shipped_config_loads() -> None:
    config = load(SHIPPED)
    assert config.path == str(SHIPPED)
    assert config.authserv_id == "mx.example.com"
    assert config.listen == "inet:8894@127.0.0.1"
    assert config.socket_mode == 0o660
    assert config.domains == frozenset({"example.com"})
    assert config.hosts["internal"] == ("127.0.0.0/8", "::1", "192.168.1.0/24")
    assert [(r.stage, r.name, r.check) for r in config.all_rules()] == [
        ("connect", "reverse dns", "iprev"),
        ("mail", "no spoofing of our domains", "mail_relay"),
        ("mail", "spf", "spf"),
        ("rcpt", "no open relay", "rcpt_relay"),
        ("eom", "dkim", "dkim_verify"),
        ("eom", "dmarc", "dmarc"),
    ]
    spf = config.stage_rules("mail")[1]
    assert spf.when is not None and spf.when.negate is not None
    assert spf.when.negate.client_in == ("internal",)
    assert spf.line == line_of(SHIPPED.read_text(), "- name: spf")


def test_minimal_config_takes_the_defaults() -> None:
    config = parse(BASE, FILE)
    assert config.listen == "inet:8894@127.0.0.1"
    assert config.workers == 2 * (os.cpu_count() or 1)  # two per core
    assert config.log_level == "info"
    assert config.dns.nameservers == ()
    assert config.spf_budget == 20.0
    assert dict(config.rules) == {}
    assert list(config.all_rules()) == []


def test_config_is_frozen() -> None:
    config = parse(BASE, FILE)
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


def test_load_of_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.file == str(path)
    assert "cannot read" in info.value.message


def test_load_of_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"authserv_id: mx.example.com\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "UTF-8" in info.value.message


# -- unknown keys, stages, checks ------------------------------------------------------------
def test_unknown_top_level_key_is_an_error_with_its_line() -> None:
    text = BASE + "workers: 2\nbogus: 1\n"
    exc = error(text)
    assert (exc.line, exc.key, exc.message) == (3, "bogus", "unknown key")
    assert str(exc) == "test.yaml:3: bogus: unknown key"


def test_unknown_key_inside_a_rule_names_its_path_and_line() -> None:
    text = BASE + yml("""
        rules:
          mail:
            - name: first
              check: spf
            - name: second
              check: spf
              polcy: strict
        """)
    exc = error(text)
    assert exc.key == "rules.mail[1].polcy"
    assert exc.line == line_of(text, "polcy")
    assert exc.message == "unknown key"


@pytest.mark.parametrize(("where", "key", "fragment"), [
    ("when:\n  clientin: x", "rules.mail[0].when.clientin", "unknown key"),
    ("when:\n  not:\n    authenticatd: true", "rules.mail[0].when.not.authenticatd",
     "unknown key"),
    ("on:\n  fail: {action: reject, cdoe: 550}", "rules.mail[0].on.fail.cdoe", "unknown key"),
    ("on:\n  fail: reject\n  fial: reject", "rules.mail[0].on.fial", "has no result 'fial'"),
])
def test_unknown_key_in_nested_sections(where: str, key: str, fragment: str) -> None:
    text = spf_rule(where)
    exc = error(text)
    assert exc.key == key
    assert exc.line == line_of(text, key.rpartition(".")[2])
    assert fragment in exc.message


@pytest.mark.parametrize("section", ["dns:\n  timout: 2", "spf:\n  budgte: 2"])
def test_unknown_key_in_dns_and_spf_sections(section: str) -> None:
    exc = error(BASE + section + "\n")
    assert exc.message == "unknown key"
    assert exc.line == 3
    assert exc.key in ("dns.timout", "spf.budgte")


def test_unknown_stage_lists_the_stages() -> None:
    text = BASE + "rules:\n  mail: []\n  data: []\n"
    exc = error(text)
    assert exc.key == "rules.data"
    assert exc.line == 4
    assert "unknown stage" in exc.message
    for stage in ("connect", "helo", "mail", "rcpt", "eom"):
        assert stage in exc.message


def test_unknown_stage_is_reported_at_the_line_of_the_stage_key() -> None:
    text = BASE + yml("""
        rules:
          data:
            - name: a
              check: spf
        """)
    exc = error(text)
    assert exc.key == "rules.data"
    assert exc.line == line_of(text, "data:")


def test_unknown_check_lists_the_known_checks() -> None:
    text = BASE + yml("""
        rules:
          mail:
            - name: a
              check: dkim
        """)
    exc = error(text)
    assert exc.key == "rules.mail[0].check"
    assert exc.line == line_of(text, "dkim")
    assert "'dkim'" in exc.message
    for name in CHECKS:
        assert name in exc.message


@pytest.mark.parametrize(("check", "stage"), [
    ("spf", "connect"), ("spf", "helo"), ("mail_relay", "connect"), ("rcpt_relay", "mail"),
    ("rcpt_relay", "eom"),
])
def test_check_at_a_stage_it_does_not_support(check: str, stage: str) -> None:
    text = BASE + f"rules:\n  {stage}:\n    - name: a\n      check: {check}\n"
    exc = error(text)
    assert exc.key == f"rules.{stage}[0].check"
    assert exc.line == 5
    assert f"not {stage}" in exc.message
    for supported in CHECKS[check].stages:
        assert supported in exc.message


@pytest.mark.parametrize("stage", ["connect", "helo", "mail", "rcpt", "eom"])
def test_iprev_runs_at_every_stage(stage: str) -> None:
    config = parse(BASE + f"rules:\n  {stage}:\n    - name: a\n      check: iprev\n", FILE)
    assert config.stage_rules(stage)[0].check == "iprev"


def test_missing_rule_name_and_check_are_required() -> None:
    exc = error(BASE + "rules:\n  mail:\n    - check: spf\n")
    assert (exc.key, exc.message, exc.line) == ("rules.mail[0].name", "is required", 4)
    exc = error(BASE + "rules:\n  mail:\n    - name: a\n")
    assert (exc.key, exc.message) == ("rules.mail[0].check", "is required")


def test_rule_that_is_not_a_mapping() -> None:
    exc = error(BASE + "rules:\n  mail:\n    - spf\n")
    assert (exc.key, exc.line, exc.message) == ("rules.mail[0]", 4, "expected a mapping")


# -- listen ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/mailwarden/milter.sock", "unix:/run/mailwarden/milter.sock"),
    ("local:/run/m.sock", "unix:/run/m.sock"),
    ("inet:8894@127.0.0.1", "inet:8894@127.0.0.1"),
    ("inet:8894@localhost", "inet:8894@localhost"),
    ("inet:8894", "inet:8894"),
    ("inet6:8894@[::1]", "inet6:8894@[::1]"),
    ("inet6:8894@::1", "inet6:8894@::1"),
    ("inet:127.0.0.1:8894", "inet:8894@127.0.0.1"),  # as Postfix writes it
    ("inet:mx.example.com:25", "inet:25@mx.example.com"),
])
def test_listen_accepted_forms(text: str, expected: str) -> None:
    assert parse_listen(text) == expected
    assert parse(BASE + f"listen: '{text}'\n", FILE).listen == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("tcp:25", "expected unix:PATH"),
    ("/run/m.sock", "expected unix:PATH"),
    ("unix:relative/path", "must be absolute"),
    ("inet:0@127.0.0.1", "bad port"),
    ("inet:65536@127.0.0.1", "bad port"),
    ("inet:port@127.0.0.1", "bad port"),
    ("inet:-1@127.0.0.1", "bad port"),
    ("inet:8894@bad_host!", "bad host"),
    ("inet:", "bad port"),
    ("8894", "expected unix:PATH"),
])
def test_bad_listen_forms(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_listen(text)
    source = BASE + "workers: 2\n" + f"listen: '{text}'\n"
    exc = error(source)
    assert (exc.key, exc.line) == ("listen", 3)
    assert fragment in exc.message


def test_listen_port_must_be_ascii_digits() -> None:
    with pytest.raises(ValueError):
        parse_listen("inet:\u0668\u0668\u0669\u0664@127.0.0.1")


# -- dns, hosts, domains ---------------------------------------------------------------------
def test_nameservers_accept_ipv4_ipv6_and_ports() -> None:
    text = BASE + yml("""
        dns:
          port: 5353
          nameservers: ['127.0.0.1', '[::1]:53', '::1', '192.0.2.1:54']
        """)
    config = parse(text, FILE)
    assert config.dns.nameservers == (
        Nameserver("127.0.0.1", 5353), Nameserver("::1", 53), Nameserver("::1", 5353),
        Nameserver("192.0.2.1", 54),
    )


@pytest.mark.parametrize("bad", ["ns1.example.com", "300.1.1.1", "127.0.0.1:0", "[::1"])
def test_bad_nameserver_names_its_index(bad: str) -> None:
    text = BASE + f"dns:\n  nameservers:\n    - 127.0.0.1\n    - '{bad}'\n"
    exc = error(text)
    assert exc.key == "dns.nameservers[1]"
    assert exc.line >= 3
    assert bad in exc.message


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("timeout", "0", "between"), ("timeout", "fast", "expected a number"),
    ("cache_size", "1.5", "whole number"), ("port", "70000", "between"),
])
def test_bad_dns_numbers(key: str, value: str, fragment: str) -> None:
    exc = error(BASE + f"dns:\n  {key}: {value}\n")
    assert (exc.key, exc.line) == (f"dns.{key}", 3)
    assert fragment in exc.message


@pytest.mark.parametrize(("entry", "fragment"), [
    ("10.0.0.0/33", "not an address or CIDR range"),
    ("300.1.2.3", "not an address or CIDR range"),
    ("2001:db8::/129", "not an address or CIDR range"),
    ("bad_name!", "not an address, CIDR range or host name"),
    ("-bad.example.com", "not an address, CIDR range or host name"),
])
def test_bad_host_entry_names_group_and_index(entry: str, fragment: str) -> None:
    text = BASE + f"hosts:\n  good: [192.0.2.1]\n  relays:\n    - 192.0.2.0/24\n    - '{entry}'\n"
    exc = error(text)
    assert exc.key == "hosts.relays[1]"
    assert exc.line >= line_of(text, "relays:")
    assert fragment in exc.message


def test_host_group_accepts_addresses_ranges_and_names() -> None:
    text = BASE + "hosts:\n  g: [192.0.2.1, 198.51.100.0/24, '2001:db8::/32', mx.example.net.]\n"
    assert parse(text, FILE).hosts["g"] == (
        "192.0.2.1", "198.51.100.0/24", "2001:db8::/32", "mx.example.net.")


def test_host_group_may_be_a_single_string() -> None:
    assert parse(BASE + "hosts:\n  g: 192.0.2.1\n", FILE).hosts["g"] == ("192.0.2.1",)


def test_bad_domain_names_its_index() -> None:
    exc = error(BASE + "domains:\n  - example.com\n  - 'bad domain'\n")
    assert exc.key == "domains[1]"
    assert "not a domain name" in exc.message


def test_domains_are_lowercased_without_trailing_dot() -> None:
    config = parse(BASE + "domains: [Example.COM., example.net]\n", FILE)
    assert config.domains == frozenset({"example.com", "example.net"})


# -- when: -----------------------------------------------------------------------------------
def test_client_in_naming_an_unknown_group() -> None:
    text = BASE + "hosts:\n  internal: [127.0.0.1]\n" + spf_rule("when:\n  client_in: [internal, "
                                                               "backup]")[len(BASE):]
    exc = error(text)
    assert exc.key == "rules.mail[0].when.client_in"
    assert exc.line == line_of(text, "client_in")
    assert "'backup'" in exc.message


def test_client_in_under_not_naming_an_unknown_group() -> None:
    text = spf_rule("when:\n  not:\n    client_in: nowhere")
    exc = error(text)
    assert exc.key == "rules.mail[0].when.not.client_in"
    assert exc.line == line_of(text, "client_in")


def test_allowed_hosts_naming_an_unknown_group() -> None:
    text = BASE + "rules:\n  rcpt:\n    - name: a\n      check: rcpt_relay\n"
    text += "      allowed_hosts: x\n"
    exc = error(text)
    assert (exc.key, exc.line) == ("rules.rcpt[0].allowed_hosts", 6)
    assert "'x'" in exc.message


def test_when_sender_domain_in_rejects_bad_domain_but_accepts_ours() -> None:
    exc = error(spf_rule("when:\n  sender_domain_in: [example.com, 'not a domain']"))
    assert exc.key == "rules.mail[0].when.sender_domain_in"
    config = parse(spf_rule("when:\n  sender_domain_in: [ours, Example.ORG]"), FILE)
    when = config.stage_rules("mail")[0].when
    assert when is not None
    assert when.sender_domain_in == ("ours", "example.org")


def test_when_authenticated_must_be_a_boolean() -> None:
    exc = error(spf_rule("when:\n  authenticated: 'maybe'"))
    assert exc.key == "rules.mail[0].when.authenticated"
    assert "true or false" in exc.message


# -- on: and replies -------------------------------------------------------------------------
def test_on_with_an_unknown_result_lists_the_results() -> None:
    text = spf_rule("on:\n  pass: continue\n  failed: reject")
    exc = error(text)
    assert exc.key == "rules.mail[0].on.failed"
    assert exc.line == line_of(text, "failed")
    for result in CHECKS["spf"].results:
        assert result in exc.message


def test_on_with_an_unknown_action() -> None:
    exc = error(spf_rule("on:\n  fail: drop"))
    assert exc.key == "rules.mail[0].on.fail"
    assert "drop" in exc.message and "reject" in exc.message


def test_on_full_outcome_is_parsed() -> None:
    config = parse(spf_rule(
        "on:\n  softfail: {action: reject, code: 550, status: 5.7.23, text: Not authorized}\n"
        "  temperror: continue"), FILE)
    rule = config.stage_rules("mail")[0]
    assert rule.on["softfail"] == Outcome("reject", 550, "5.7.23", "Not authorized")
    assert rule.on["temperror"] == Outcome("continue")


@pytest.mark.parametrize("status", ["5.7", "6.7.1", "5.7.1000", "5.x.1", "5.7.1 ", "55.7.1"])
def test_bad_enhanced_status_code_rfc3463(status: str) -> None:
    with pytest.raises(ValueError):
        parse_status(status)
    text = spf_rule(f"on:\n  fail: {{action: reject, status: '{status}'}}")
    exc = error(text)
    assert exc.key == "rules.mail[0].on.fail.status"
    assert exc.line == line_of(text, "status")
    assert "RFC 3463" in exc.message


@pytest.mark.parametrize("status", ["5.7.1", "4.4.3", "2.0.0", "5.7.255"])
def test_good_enhanced_status_code_rfc3463(status: str) -> None:
    assert parse_status(status) == status


def test_code_and_status_class_mismatch() -> None:
    exc = error(spf_rule("on:\n  fail: {action: reject, code: 550, status: 4.7.1}"))
    assert exc.key == "rules.mail[0].on.fail.status"
    assert "does not match" in exc.message


@pytest.mark.parametrize(("action", "status"), [
    ("tempfail", "5.7.1"), ("reject", "4.7.1"), ("reject", "2.0.0"),
])
def test_status_class_must_match_the_action_without_a_code(action: str, status: str) -> None:
    exc = error(spf_rule(f"on:\n  fail: {{action: {action}, status: {status}}}"))
    assert exc.key == "rules.mail[0].on.fail.status"


@pytest.mark.parametrize("text", ["bad\\r\\nX-Injected: yes", "tab\\there", "caf\\u00e9",
                                  "nul\\0"])
def test_reply_text_with_control_or_non_ascii_characters(text: str) -> None:
    source = spf_rule(f'on:\n  fail: {{action: reject, text: "{text}"}}')
    exc = error(source)
    assert exc.key == "rules.mail[0].on.fail.text"
    assert exc.line == line_of(source, "text:")
    assert "printable ASCII" in exc.message


def test_tempfail_with_a_5xx_code() -> None:
    exc = error(spf_rule("on:\n  temperror: {action: tempfail, code: 550}"))
    assert exc.key == "rules.mail[0].on.temperror.code"
    assert "4xx" in exc.message


def test_reject_with_a_4xx_code() -> None:
    exc = error(spf_rule("on:\n  fail: {action: reject, code: 451}"))
    assert exc.key == "rules.mail[0].on.fail.code"
    assert "5xx" in exc.message


@pytest.mark.parametrize("action", ["accept", "continue", "quarantine", "discard"])
def test_reply_code_only_with_reject_or_tempfail(action: str) -> None:
    exc = error(spf_rule(f"on:\n  fail: {{action: {action}, code: 550}}"))
    assert exc.key == "rules.mail[0].on.fail.code"
    assert "reject or tempfail" in exc.message


@pytest.mark.parametrize(("code", "fragment"), [
    ("abc", "expected a number"), ("550.5", "whole number"), ("600", "between"),
    ("199", "between"),
])
def test_bad_reply_code(code: str, fragment: str) -> None:
    exc = error(spf_rule(f"on:\n  fail: {{action: reject, code: {code}}}"))
    assert exc.key == "rules.mail[0].on.fail.code"
    assert fragment in exc.message


def test_outcome_mapping_requires_an_action() -> None:
    exc = error(spf_rule("on:\n  fail: {code: 550}"))
    assert (exc.key, exc.message) == ("rules.mail[0].on.fail.action", "is required")


# -- rule names, duplicates, YAML ------------------------------------------------------------
def test_duplicate_rule_names_in_a_stage() -> None:
    text = BASE + yml("""
        rules:
          mail:
            - name: same
              check: spf
            - name: same
              check: mail_relay
        """)
    exc = error(text)
    assert exc.key == "rules.mail[1]"
    assert exc.line == line_of(text, "name: same", 2)
    assert "duplicate rule name 'same'" in exc.message


@pytest.mark.parametrize(("text", "key", "needle"), [
    (BASE + "workers: 2\nworkers: 3\n", "workers", "workers: 3"),
    (BASE + "hosts:\n  g: [192.0.2.1]\n  g: [192.0.2.2]\n", "hosts.g", "192.0.2.2"),
    (BASE + "rules:\n  mail: []\n  mail: []\n", "rules.mail", "mail: []\n"),
    (BASE + "rules:\n  mail:\n    - name: a\n      check: spf\n      name: b\n",
     "rules.mail[0].name", "name: b"),
])
def test_duplicate_keys(text: str, key: str, needle: str) -> None:
    exc = error(text)
    assert exc.key == key
    assert exc.message == "duplicate key"
    lines = text.splitlines()
    assert needle.strip() in lines[exc.line - 1]
    # the second occurrence, not the first
    assert exc.line == max(i for i, line in enumerate(lines, 1) if needle.strip() in line)


def test_yaml_syntax_error_has_its_line() -> None:
    text = BASE + "workers: 2\nrules:\n  mail: [\n"
    exc = error(text)
    assert exc.key == ""
    assert "YAML syntax error" in exc.message
    assert exc.line == 5

    exc = error(BASE + "a: b\n c: d\n")
    assert exc.line == 3
    assert "YAML syntax error" in exc.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    exc = error(text)
    assert exc.message == "the file is empty"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    exc = error(text)
    assert exc.message == "expected a mapping"
    assert exc.line == 1


def test_missing_authserv_id() -> None:
    exc = error("workers: 2\n")
    assert exc.key == "authserv_id"
    assert "is required" in exc.message


def test_bad_authserv_id() -> None:
    exc = error("authserv_id: 'not a host'\n")
    assert (exc.key, exc.line) == ("authserv_id", 1)
    assert "not a domain name" in exc.message


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("workers: two\n", "workers", "expected a number (got 'two')"),
    ("workers: true\n", "workers", "expected a number"),
    ("drain_timeout: '30'\n", "drain_timeout", "expected a number"),
    ("spf:\n  budget: soon\n", "spf.budget", "expected a number"),
    ("workers: 0\n", "workers", "between 1 and 64"),
    ("workers: 2.5\n", "workers", "whole number"),
    ("log_level: loud\n", "log_level", "must be one of"),
    ("log:\n  target: file\n", "log.target", "must be one of"),
    ("log:\n  facility: kern\n", "log.facility", "must be one of"),
    ("log:\n  target: syslog\n  address: dev/log\n", "log.address", "absolute path"),
    ("log:\n  address: /dev/log\n", "log.address", "is for target syslog or journal"),
    ("socket_mode: '0999'\n", "socket_mode", "octal mode"),
    ("user: [a, b]\n", "user", "expected a single value"),
])
def test_wrong_scalar_types(text: str, key: str, fragment: str) -> None:
    exc = error(BASE + text)
    assert exc.key == key
    assert exc.line == line_of(BASE + text, key.rpartition(".")[2])
    assert fragment in exc.message


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("dns:\n  - 127.0.0.1\n", "dns", "expected a mapping"),
    ("hosts: [192.0.2.1]\n", "hosts", "expected a mapping"),
    ("rules:\n  - name: a\n", "rules", "expected a mapping"),
    ("rules:\n  mail: {name: a}\n", "rules.mail", "expected a list"),
    ("domains: {a: b}\n", "domains", "expected a list"),
    ("rules:\n  mail:\n    - name: a\n      check: spf\n      on: [fail]\n",
     "rules.mail[0].on", "expected a mapping"),
    ("rules:\n  mail:\n    - name: a\n      check: spf\n      when: [x]\n",
     "rules.mail[0].when", "expected a mapping"),
])
def test_wrong_container_types(text: str, key: str, fragment: str) -> None:
    exc = error(BASE + text)
    assert exc.key == key
    assert fragment in exc.message
    assert exc.line > 1


@pytest.mark.parametrize("text", [
    "workers:\n",
    "listen:\n",
    "rules:\n  mail:\n    - name: a\n      check: spf\n      on:\n        fail:\n",
])
def test_empty_value_is_a_located_config_error(text: str) -> None:
    exc = error(BASE + text)
    assert exc.line >= 2


def test_unquoted_octal_socket_mode_is_not_silently_changed() -> None:
    try:
        config = parse(BASE + "socket_mode: 0660\n", FILE)
    except ConfigError:
        return  # refusing it is fine too
    assert config.socket_mode == 0o660


def test_quoted_socket_mode() -> None:
    assert parse(BASE + "socket_mode: '0640'\n", FILE).socket_mode == 0o640
    assert parse(BASE + "socket_mode: '600'\n", FILE).socket_mode == 0o600


def test_config_error_text_without_line_or_key() -> None:
    assert str(ConfigError("f.yaml", 0, "", "boom")) == "f.yaml: boom"
    assert str(ConfigError("f.yaml", 7, "a.b", "boom")) == "f.yaml:7: a.b: boom"


# -- the Section reader ----------------------------------------------------------------------
def _section(text: str) -> Section:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    assert isinstance(node, yaml.MappingNode)
    return Section(node, FILE, "top")


def test_section_finish_rejects_keys_nobody_read() -> None:
    section = _section("a: 1\nb: 2\n")
    assert section.integer("a", 0) == 1
    with pytest.raises(ConfigError) as info:
        section.finish()
    assert (info.value.key, info.value.line) == ("top.b", 2)


def test_section_str_list_takes_a_single_string_as_one_item() -> None:
    section = _section("one: x\nmany: [a, 2, true]\n")
    assert section.str_list("one") == ("x",)
    assert section.str_list("many") == ("a", "2", "true")
    assert section.str_list("absent", ("d",)) == ("d",)
    section.finish()


def test_section_str_list_item_must_be_a_string() -> None:
    section = _section("many:\n  - a\n  - {b: c}\n")
    with pytest.raises(ConfigError) as info:
        section.str_list("many")
    assert (info.value.key, info.value.line) == ("top.many[1]", 3)


# -- is_our_domain ---------------------------------------------------------------------------
@pytest.mark.parametrize(("domain", "ours"), [
    ("example.com", True), ("EXAMPLE.com.", True), ("mail.example.com", True),
    ("a.b.example.com", True), ("example.org", True), ("notexample.com", False),
    ("example.com.evil.net", False), ("com", False), ("", False), ("sub.example.net", False),
])
def test_is_our_domain_includes_subdomains(domain: str, ours: bool) -> None:
    config = parse(BASE + "domains: [example.com, example.org]\n", FILE)
    assert config.is_our_domain(domain) is ours


# -- the check-config command ----------------------------------------------------------------
def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", "check-config", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)


def test_check_config_prints_the_effective_policy_of_the_shipped_config() -> None:
    done = check_config(str(SHIPPED))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[-1] == "OK: mailwarden run would start with this configuration"
    # written as the configuration writes it: no Python reprs (issue 15 #4)
    assert "('" not in out and "{'" not in out and "None" not in out, out
    assert "dmarc mode rfc9989  store /var/lib/mailwarden/dmarc.db" in out
    for rule in load(SHIPPED).all_rules():
        assert f"- {rule.name} (line {rule.line}): {rule.check}" in out
    # the replies as sent: the check's own words (issue 15 #4), a temperror's fixed text
    assert ("fail       -> reject 550 5.7.23 SPF fail: IP is not allowed to send mail for "
            "DOMAIN") in out
    assert "temperror  -> tempfail 451 4.7.24 SPF validation error, try again later" in out
    assert "fail       -> reject 554 5.7.1 <RCPT>: Relay access denied" in out
    assert "fail       -> reject 554 5.7.1 Sender address <ADDR> is not allowed from CLIENT" \
        in out
    assert "temperror  -> tempfail 451 4.4.3 Temporary DNS failure, try again later" in out
    assert "softfail   -> continue" in out
    # every result of every rule has a line
    expected = sum(len(CHECKS[r.check].results) for r in load(SHIPPED).all_rules())
    assert sum(1 for line in out.splitlines() if " -> " in line) == expected


def test_check_config_json_parses() -> None:
    done = check_config("--json", str(SHIPPED))
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    assert policy["authserv_id"] == "mx.example.com"
    mail = policy["rules"]["mail"]
    assert [r["name"] for r in mail] == ["no spoofing of our domains", "spf"]
    assert mail[1]["results"]["fail"] == ("reject 550 5.7.23 SPF fail: IP is not allowed to "
                                           "send mail for DOMAIN")
    assert mail[1]["when"] == {"authenticated": False, "not": {"client_in": ["internal"]}}
    assert policy["rules"]["connect"][0]["results"] == {
        "pass": "continue", "fail": "continue", "temperror": "continue",
        "permerror": "continue"}


def test_check_config_shows_on_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + yml("""
        rules:
          connect:
            - name: rdns
              check: iprev
              on: {fail: reject, temperror: reject}
          mail:
            - name: spf
              check: spf
              policy: strict
              on:
                neutral: {action: tempfail, text: Try later}
        """))
    done = check_config("--json", str(path))
    policy = json.loads(done.stdout)
    # run as root (the test), a configuration without `user:` is one `run` refuses
    assert done.returncode == (1 if os.geteuid() == 0 else 0), policy["problems"]
    iprev = policy["rules"]["connect"][0]["results"]
    assert iprev["fail"] == "reject 550 5.7.25 Reverse DNS of IP: REASON"
    assert iprev["temperror"].startswith("tempfail 451 4.7.25")  # never a permanent reject
    spf = policy["rules"]["mail"][0]["results"]
    assert spf["softfail"] == ("reject 550 5.7.23 SPF softfail: IP is not allowed to send mail "
                               "for DOMAIN")
    assert spf["permerror"] == "reject 550 5.7.24 SPF permerror for DOMAIN: REASON"
    assert spf["neutral"] == "tempfail 451 4.7.1 Try later"


def test_check_config_reports_file_line_key_message(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    text = BASE + "rules:\n  mail:\n    - name: a\n      check: spf\n      polcy: strict\n"
    path.write_text(text)
    done = check_config(str(path))
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"{path}:6: rules.mail[0].polcy: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_reports_missing_file(tmp_path: Path) -> None:
    done = check_config(str(tmp_path / "absent.yaml"))
    assert done.returncode == 1
    assert "absent.yaml" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_takes_config_like_every_other_command() -> None:
    """`--config PATH`, as run, test and dmarc take it (issue 15 #6); the bare path still works."""
    positional = check_config("--json", str(SHIPPED))
    option = check_config("--json", "--config", str(SHIPPED))
    assert option.returncode == positional.returncode
    assert json.loads(option.stdout)["file"] == json.loads(positional.stdout)["file"]


def test_the_default_configuration_path_does_not_depend_on_the_directory() -> None:
    """Started from / (systemd, cron, a root shell), the commands used to look for a relative
    conf/mailwarden.yaml (issue 15 #6): the default is where Debian keeps configuration."""
    from mailwarden import cli

    assert cli.DEFAULT_CONFIG == "/etc/mailwarden/mailwarden.yaml"
    done = subprocess.run([sys.executable, "-m", "mailwarden", "run", "--help"],
                          capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert "default: /etc/mailwarden/mailwarden.yaml" in done.stdout


def test_log_section_defaults_and_values() -> None:
    from mailwarden.config.model import LogConfig, LogTarget

    assert parse(BASE).log == LogConfig(LogTarget.STDERR, "mail", "")
    config = parse(BASE + "log:\n  target: journal\n  facility: local3\n  address: /run/j\n")
    assert config.log == LogConfig(LogTarget.JOURNAL, "local3", "/run/j")


def test_host_entries_from_a_file_with_exclusions(tmp_path: Path) -> None:
    """OpenDKIM's InternalHosts files, as they are (issue 16): comments, localhost, `!`."""
    listing = tmp_path / "internal"
    listing.write_text("# our networks\n127.0.0.1\nlocalhost\n\n10.0.0.0/8   # office\n"
                       "!10.9.0.0/16\nmx.example.com\n")
    config = parse(BASE + f"hosts:\n  internal: [192.0.2.1, 'file:{listing}']\n")
    assert config.hosts["internal"] == ("192.0.2.1", "127.0.0.1", "localhost", "10.0.0.0/8",
                                        "!10.9.0.0/16", "mx.example.com")


@pytest.mark.parametrize(("content", "where", "fragment"), [
    ("10.0.0.0/8\nbad_name\n", "LIST:2", "not an address, CIDR range or host name"),
    (None, "CONFIG:3", "cannot read"),
])
def test_a_bad_host_file_names_the_file_and_line(tmp_path: Path, content: str | None,
                                                 where: str, fragment: str) -> None:
    listing = tmp_path / "internal"
    if content is not None:
        listing.write_text(content)
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"hosts:\n  internal: ['file:{listing}']\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    exc = caught.value
    expected = where.replace("LIST", str(listing)).replace("CONFIG", str(path))
    assert f"{exc.file}:{exc.line}" == expected, str(exc)
    assert exc.key == "hosts.internal[0]" and fragment in exc.message


def test_a_relative_host_file_is_refused() -> None:
    exc = error(BASE + "hosts:\n  internal: ['file:internal.txt']\n")
    assert "absolute path" in exc.message and exc.key == "hosts.internal[0]"

