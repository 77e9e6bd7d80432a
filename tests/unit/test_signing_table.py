"""The signing table and staged keys (issue 16): OpenDKIM SigningTable setups carried over,
one key signing for other domains and per-address entries, the first match deciding, and
keys that are checked but never sign until switched."""

from __future__ import annotations

import pytest
from test_dkim_keys_and_sign import FILE, config_error, config_text

from mailwarden.config import ConfigError
from mailwarden.config.build import parse
from mailwarden.dkim.keys import generate, write_private
from mailwarden.dkim.table import matches, normalize


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("keys")
    files = {}
    for name, kind in (("rsa", "rsa"), ("ed", "ed25519")):
        files[name] = str(where / f"{name}.pem")
        write_private(generate(kind, 2048), files[name])
    return files


@pytest.mark.parametrize(("pattern", "address", "hit"), [
    ("*@example.com", "a@example.com", True),
    ("*@example.com", "a@EXAMPLE.com.", True),
    ("*@example.com", "a@mail.example.com", False),
    ("*@*.example.com", "a@mail.example.com", True),
    ("*@*.example.com", "a@x.y.example.com", True),
    ("*@*.example.com", "a@example.com", False),
    ("*@*.example.com", "a@badexample.com", False),
    ("ceo@example.com", "CEO@example.com", True),
    ("ceo@example.com", "cfo@example.com", False),
    ("*", "anyone@anywhere.example", True),
])
def test_patterns(pattern: str, address: str, hit: bool) -> None:
    assert matches(normalize(pattern), address) is hit


@pytest.mark.parametrize(("written", "canonical"), [
    ("example.com", "*@example.com"), ("*.Example.com", "*@*.example.com"),
    ("*@*.example.com", "*@*.example.com"), ("Ceo@Example.com", "ceo@example.com"),
])
def test_opendkim_spellings_normalize(written: str, canonical: str) -> None:
    assert normalize(written) == canonical


def table_config(key_files: dict[str, str], table: str, rsa_state: str = "active") -> str:
    return config_text(f"""
        - {{domain: example.com, selector: r, key: {key_files['rsa']}, state: {rsa_state}}}
        - {{domain: example.com, selector: e, key: {key_files['ed']}}}
        - {{domain: example.net, selector: x, key: {key_files['rsa']}}}
        """, "  table:\n" + table)


def test_the_first_matching_entry_decides(key_files: dict[str, str]) -> None:
    signing = parse(table_config(key_files, """\
    - {from: ceo@example.org, keys: example.net/x}
    - {from: "*@example.org", keys: [example.com/r, example.com/e]}
    - {from: "*.example.org", keys: example.com/e}
"""), FILE).signing

    def signers(address: str) -> list[str]:
        return [f"{k.domain}/{k.selector}" for k in signing.keys_for_author(address)]

    assert signers("ceo@example.org") == ["example.net/x"]  # per address
    assert signers("staff@example.org") == ["example.com/r", "example.com/e"]  # another d=
    assert signers("a@lists.example.org") == ["example.com/e"]
    # with a table, the table alone decides: a key's own domain is not signed implicitly
    assert signers("a@example.com") == []


def test_a_staged_key_is_loaded_and_never_signs(key_files: dict[str, str]) -> None:
    signing = parse(table_config(key_files, """\
    - {from: "*@example.com", keys: [example.com/r, example.com/e]}
""", rsa_state="staged"), FILE).signing
    assert [k.selector for k in signing.keys if k.staged] == ["r"]
    assert [k.selector for k in signing.keys_for_author("a@example.com")] == ["e"]
    assert "r" not in [k.selector for k in signing.active]


def test_without_a_table_staged_keys_do_not_sign_either(key_files: dict[str, str]
                                                         ) -> None:
    text = config_text(f"""
        - {{domain: example.com, selector: old, key: {key_files['rsa']}}}
        - {{domain: example.com, selector: new, key: {key_files['ed']}, state: staged}}
        """)
    signing = parse(text, FILE).signing
    assert [k.selector for k in signing.keys_for_author("a@example.com")] == ["old"]


@pytest.mark.parametrize(("table", "key", "fragment"), [
    ("    - {from: '*@example.org', keys: example.com/nope}\n", "signing.table[0].keys",
     "not in signing.keys"),
    ("    - {from: 'ceo@*.example.org', keys: example.com/r}\n", "signing.table[0].from",
     "subdomain wildcard"),
    ("    - {from: 'not a domain', keys: example.com/r}\n", "signing.table[0].from",
     "not a domain name"),
    ("    - {from: example.org, keys: []}\n", "signing.table[0].keys", "at least one"),
])
def test_table_errors_name_the_entry(key_files: dict[str, str], table: str, key: str,
                                     fragment: str) -> None:
    exc = config_error(table_config(key_files, table))
    assert exc.key == key and fragment in exc.message, str(exc)


def test_a_key_listed_twice_is_an_error(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - {{domain: example.com, selector: r, key: {key_files['rsa']}}}
        - {{domain: example.com, selector: r, key: {key_files['ed']}}}
        """)
    with pytest.raises(ConfigError, match="listed twice"):
        parse(text, FILE)


def test_check_config_shows_staged_keys_and_the_table(key_files: dict[str, str]) -> None:
    from mailwarden.policy.describe import effective_policy, format_policy

    config = parse(table_config(key_files, """\
    - {from: ceo@example.org, keys: example.net/x}
""", rsa_state="staged"), FILE)
    text = format_policy(effective_policy(config))
    assert f"signing key example.com/r rsa-sha256 {key_files['rsa']}  (staged: never signs)" \
        in text
    assert "signing table ceo@example.org -> example.net/x" in text


def test_the_sign_check_signs_with_the_table_and_verifiable_d(key_files: dict[str, str]
                                                              ) -> None:
    """Through the dkim_sign check: a per-address entry signs with another domain's key
    (d=example.net), an unmatched author is not signed and the log says why."""
    from mailwarden.checks import CHECKS
    from mailwarden.checks.base import Context
    from mailwarden.transaction import Transaction

    from fakedns import FakeDNS

    config = parse(table_config(key_files, """\
    - {from: ceo@example.org, keys: example.net/x}
""") + "rules:\n  eom:\n    - {name: sign, check: dkim_sign, authenticated: false}\n", FILE)
    ctx = Context(config, FakeDNS(), {})
    rule = config.stage_rules("eom")[0]

    def sign(author: str) -> tuple[str, str, list[str]]:
        txn = Transaction.for_client("192.0.2.1")
        txn.headers = [("From", f" Boss <{author}>"), ("Subject", " hi")]
        done = CHECKS["dkim_sign"].run(ctx, txn, rule.args)
        return done.decisive, done.text, [value for _, value in done.headers]

    result, _, fields = sign("ceo@example.org")
    assert result == "signed" and len(fields) == 1
    assert " d=example.net;" in " ".join(fields[0].split()) + ";"
    assert "s=x;" in fields[0].replace(" ", "")
    assert sign("staff@example.org")[:2] == ("none", "no signing.table entry for example.org")


@pytest.mark.parametrize(("general", "specific", "covered"), [
    ("*", "ceo@example.org", True),
    ("*@example.org", "ceo@example.org", True),
    ("*@*.example.com", "*@lists.example.com", True),
    ("*@*.example.com", "*@example.com", False),
    ("ceo@example.org", "*@example.org", False),
    ("*@example.org", "*@*.example.org", False),
])
def test_covers_says_which_entries_also_match(general: str, specific: str,
                                              covered: bool) -> None:
    from mailwarden.dkim.table import covers

    assert covers(normalize(general), normalize(specific)) is covered
