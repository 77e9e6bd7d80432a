"""The documentation is tested against the code, so that it cannot drift.

- docs/configuration.md: the keys documented are exactly the keys the parser reads
  (`Section.trace` while parsing tests/data/config/full.yaml, which uses every section and every
  check), each check's arguments under its own heading; each check's stages, results and default
  actions and replies; the simple defaults.
- docs/reply-codes.md: every reply the checks, the engine and the milter can give, with its
  code, enhanced status and default action.
- Every config key path cited in the docs exists; every YAML example in the docs parses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config, ConfigError, Outcome, Section, as_section
from mailwarden.config.build import parse
from mailwarden.dkim.keys import generate, write_private
from mailwarden.policy import codes
from mailwarden.results import Result

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
REPLY_CODES = DOCS / "reply-codes.md"
MIGRATING = DOCS / "migrating.md"
LOGGING = DOCS / "logging.md"
FULL = ROOT / "tests" / "data" / "config" / "full.yaml"
EXAMPLE = ROOT / "conf" / "mailwarden.yaml"
SRC = ROOT / "src" / "mailwarden"
# Key paths in the docs and in full.yaml name key files here; the test writes them to tmp_path.
KEY_DIR = "/etc/mailwarden/keys/"
# The keys `_rule` reads itself; every other key of a rule is an argument of its check.
COMMON_RULE_KEYS = frozenset({"name", "check", "mode", "when", "on"})
RULE = "rules.<stage>[]."
REFUSALS = ("reject", "tempfail", "quarantine", "discard")


# -- markdown ------------------------------------------------------------------------------------
def cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text: str) -> Iterator[tuple[str | None, list[str], list[list[str]]]]:
    """(check of the enclosing heading or None, header cells, rows) for every table."""
    check: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            named = re.match(r"`([a-z_]+)`", heading.group(1))
            check = named.group(1) if named and named.group(1) in CHECKS else None
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(cells(lines[i]))
                i += 1
            yield check, block[0], block[2:]
            continue
        i += 1


def first_code(cell: str) -> str:
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else cell


def check_sections(text: str) -> dict[str, str]:
    """The text of each `### \\`check\\`` section."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r"#+\s+`([a-z_]+)`", line)
        if re.match(r"#+\s", line):
            current = heading.group(1) if heading and heading.group(1) in CHECKS else None
            if current is not None:
                sections[current] = ""
            continue
        if current is not None:
            sections[current] += line + "\n"
    return sections


Key = tuple[str | None, str]  # (check the key is an argument of, or None; normalised key path)


def documented_keys() -> dict[Key, list[str]]:
    """Every key of docs/configuration.md with its table row."""
    keys: dict[Key, list[str]] = {}
    for check, header, rows in tables(CONFIGURATION.read_text(encoding="utf-8")):
        if header[0] != "Key":
            continue
        for row in rows:
            path = first_code(row[0])
            if check is not None:
                assert path.startswith(RULE), f"{path} documented under check {check}"
                assert path[len(RULE):].split(".")[0] not in COMMON_RULE_KEYS, path
            key = (check, path)
            assert key not in keys, f"{path} documented twice"
            keys[key] = row
    return keys


def show(keys: set[Key]) -> str:
    return "\n".join(f"  {check + ': ' if check else ''}{path}"
                     for check, path in sorted(keys, key=lambda k: (k[0] or "", k[1])))


# -- the parser ------------------------------------------------------------------------------------
@contextmanager
def tracing() -> Iterator[set[str]]:
    Section.trace = set()
    try:
        yield Section.trace
    finally:
        Section.trace = None


def with_keys(text: str, directory: Path) -> str:
    """Create (mode 0600) the key files `text` names under KEY_DIR, and point it at them."""
    for name in sorted(set(re.findall(re.escape(KEY_DIR) + r"([\w.-]+)", text))):
        path = directory / name
        if not path.exists():
            write_private(generate("ed25519" if "ed25519" in name else "rsa", 2048), str(path))
    return text.replace(KEY_DIR, f"{directory}/")


def normalise(path: str, data: dict[str, Any]) -> Key:
    """A traced key path in the documentation's form, with the check it belongs to."""
    rule = re.fullmatch(r"rules\.(\w+)\[(\d+)\]\.(.+)", path)
    if rule:
        stage, index, rest = rule.group(1), int(rule.group(2)), rule.group(3).split(".")
        if rest[0] == "when":
            tail = rest[1:]
            while len(tail) > 1 and tail[0] == "not":  # when.not.not.x reads like when.x
                tail = tail[1:]
            rest = ["when", *tail]
        elif rest[0] == "on" and len(rest) > 1:
            rest[1] = "<result>"
        check = None if rest[0] in COMMON_RULE_KEYS else data["rules"][stage][index]["check"]
        return check, RULE + ".".join(rest)
    if re.fullmatch(r"rules\.\w+", path):
        return None, "rules.<stage>"
    if path.startswith("hosts."):
        return None, "hosts.<name>"
    return None, re.sub(r"\[\d+\]", "[]", path)


def parse_traced(text: str, file: str) -> tuple[Config, set[Key]]:
    with tracing() as trace:
        config = parse(text, file)
    data = yaml.safe_load(text)
    return config, {normalise(path, data) for path in trace}


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def full(key_dir: Path) -> tuple[Config, set[Key]]:
    text = with_keys(FULL.read_text(encoding="utf-8"), key_dir)
    try:
        return parse_traced(text, str(FULL))
    except ConfigError as exc:
        pytest.fail(f"tests/data/config/full.yaml does not parse: {exc}")


def default_args(name: str, config: Config) -> Any:
    """A check's arguments when the rule gives none (None when one is required)."""
    empty = yaml.compose("{}")
    assert empty is not None
    section = as_section(empty, "<defaults>", "rules.eom[0]")
    try:
        return CHECKS[name].parse_args(section, config)
    except ConfigError:
        return None


# -- configuration.md ----------------------------------------------------------------------------
def test_full_config_uses_every_check_and_stage() -> None:
    data = yaml.safe_load(FULL.read_text(encoding="utf-8"))
    used = {rule["check"] for rules in data["rules"].values() for rule in rules}
    assert used == set(CHECKS), f"full.yaml lacks the checks {sorted(set(CHECKS) - used)}"
    assert set(data["rules"]) == set(STAGES)


def test_reference_documents_exactly_what_the_parser_reads(full: tuple[Config, set[Key]]
                                                           ) -> None:
    _, read = full
    documented = set(documented_keys())
    undocumented = read - documented
    unread = documented - read
    assert not undocumented and not unread, (
        "docs/configuration.md and the parser disagree.\n"
        f"Read by the parser, not documented:\n{show(undocumented) or '  -'}\n"
        f"Documented, not read by the parser of tests/data/config/full.yaml:\n"
        f"{show(unread) or '  -'}")


def test_shipped_example_uses_only_documented_keys() -> None:
    _, read = parse_traced(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))
    unknown = read - set(documented_keys())
    assert not unknown, f"conf/mailwarden.yaml reads undocumented keys:\n{show(unknown)}"


def test_every_check_documents_stages_results_and_defaults(full: tuple[Config, set[Key]]
                                                           ) -> None:
    config, _ = full
    text = CONFIGURATION.read_text(encoding="utf-8")
    sections = check_sections(text)
    assert set(sections) == set(CHECKS), "each check needs a ### `name` section"
    results: dict[str, dict[str, list[str]]] = {name: {} for name in CHECKS}
    for check, header, rows in tables(text):
        if check is not None and header[0] == "Result":
            for row in rows:
                results[check][first_code(row[0])] = row
    problems = []
    for name, spec in CHECKS.items():
        stages = re.search(r"^Stages: (.*)$", sections[name], re.MULTILINE)
        if stages is None or re.findall(r"`(\w+)`", stages.group(1)) != list(spec.stages):
            problems.append(f"{name}: stages should read {', '.join(spec.stages)}")
        if set(results[name]) != set(spec.results):
            problems.append(f"{name}: results {sorted(results[name])} != {sorted(spec.results)}")
        defaults = spec.outcomes(default_args(name, config))
        for result, row in results[name].items():
            action = (defaults.get(result) or Outcome("continue")).action
            if first_code(row[1]) != action:
                problems.append(f"{name} {result}: default action is {action}, not {row[1]}")
            reply = spec.replies.get(result)
            wanted = f"{reply.code} {reply.status}" if reply else "generic"
            if wanted not in row[2]:
                problems.append(f"{name} {result}: default reply is {wanted}, not {row[2]}")
    assert not problems, "\n".join(problems)


def literal(cell: str) -> Any:
    """The value of a Default cell that is one literal (`2.0`, `true`, `rfc9989`), else a
    marker that matches nothing."""
    if cell == "empty":
        return ()
    found = re.fullmatch(r"`([^`]+)`", cell)
    return yaml.safe_load(found.group(1)) if found else NotImplemented


def test_documented_defaults_are_the_parsers(full: tuple[Config, set[Key]]) -> None:
    config, _ = full
    minimal = parse("authserv_id: mx.example.com\ndns: {}\nspf: {}\nsigning: {}\ndmarc: {}\n")
    actual: dict[Key, Any] = {
        (None, "listen"): minimal.listen,
        (None, "log_level"): minimal.log_level,
        (None, "drain_timeout"): minimal.drain_timeout,
        (None, "spool_threshold"): minimal.spool_threshold,
        (None, "mode"): minimal.mode,
        (None, "domains"): tuple(minimal.domains),
        (None, "dns.timeout"): minimal.dns.timeout,
        (None, "dns.lifetime"): minimal.dns.lifetime,
        (None, "dns.cache_size"): minimal.dns.cache_size,
        (None, "spf.budget"): minimal.spf_budget,
        (None, "signing.keys"): minimal.signing.keys,
        (None, "signing.canonicalization"): "/".join(minimal.signing.canonicalization),
        (None, "signing.parent_domains"): minimal.signing.parent_domains,
        (None, "signing.allow_group_readable_keys"): False,
        (None, "dmarc.mode"): minimal.dmarc.mode,
    }
    for name in CHECKS:
        args = default_args(name, config)
        for field in getattr(args, "__dataclass_fields__", {}):
            actual[(name, RULE + field)] = getattr(args, field)
    documented = documented_keys()
    problems = []
    for key, value in actual.items():
        row = documented.get(key)
        if row is None:
            problems.append(f"{key[1]} is not documented")
        elif literal(row[2]) != value:
            problems.append(f"{key[0] or ''} {key[1]}: default {value!r}, documented {row[2]}")
    assert not problems, "\n".join(problems)


# -- key paths and examples in every document --------------------------------------------------
def test_key_paths_cited_in_the_docs_exist() -> None:
    documented = {path for _, path in documented_keys()}
    top = {path for path in documented if "." not in path}
    problems = []
    for doc in (CONFIGURATION, REPLY_CODES, MIGRATING, LOGGING):
        for token in re.findall(r"`([^`\s]+)`", doc.read_text(encoding="utf-8")):
            if not re.fullmatch(r"[a-z_]+(?:\.[A-Za-z0-9_<>\[\]]+)+", token):
                continue
            if token.split(".")[0].split("[")[0] not in top:
                continue  # a domain name, a file name
            path = re.sub(r"\[\d+\]", "[]", token)
            path = re.sub(r"^rules\.(" + "|".join(STAGES) + r")\b", "rules.<stage>", path)
            path = re.sub(r"^hosts\.(?!<name>)[^.]+", "hosts.<name>", path)
            if not any(key == path or key.startswith((path + ".", path + "["))
                       for key in documented):
                problems.append(f"{doc.name}: `{token}`")
    assert not problems, "key paths that are not in docs/configuration.md:\n" + \
        "\n".join(problems)


def test_yaml_examples_in_the_docs_parse(tmp_path: Path) -> None:
    documented = set(documented_keys())
    for doc in (CONFIGURATION, REPLY_CODES, MIGRATING, LOGGING):
        blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL)
        for block in blocks:
            text = block if re.search(r"^authserv_id:", block, re.MULTILINE) else \
                "authserv_id: mx.example.com\nhosts: {internal: 127.0.0.1}\n" + block
            try:
                _, read = parse_traced(with_keys(text, tmp_path), doc.name)
            except ConfigError as exc:
                pytest.fail(f"a YAML example in {doc.name} does not parse: {exc}\n{block}")
            assert read <= documented, f"{doc.name}: undocumented keys {show(read - documented)}"


# -- reply-codes.md --------------------------------------------------------------------------------
def reply_rows() -> list[list[str]]:
    rows = []
    for _, header, body in tables(REPLY_CODES.read_text(encoding="utf-8")):
        if header[0] == "Check":
            assert header[3:5] == ["Code", "Status"], header
            rows.extend(body)
    return rows


def source_replies() -> set[tuple[str, str]]:
    """Every (code, enhanced status) literal in the code that builds replies."""
    files = [*sorted((SRC / "checks").glob("*.py")), *sorted((SRC / "policy").glob("*.py")),
             SRC / "stage.py", *sorted((SRC / "transports").glob("*.py"))]
    found = set()
    for file in files:
        found |= set(re.findall(r"\b([245]\d\d), \"([245]\.\d{1,3}\.\d{1,3})\"",
                                file.read_text(encoding="utf-8")))
    return found


def test_reply_codes_of_every_check(full: tuple[Config, set[Key]]) -> None:
    config, _ = full
    expected: dict[tuple[str, str], tuple[str, str, str]] = {}
    for name, spec in CHECKS.items():
        defaults = spec.outcomes(default_args(name, config))
        for result in spec.results:
            action = (defaults.get(result) or Outcome("continue")).action
            reply = spec.replies.get(result)
            if reply is None and action in ("reject", "tempfail"):
                reply = codes.GENERIC_REJECT if action == "reject" else codes.GENERIC_TEMPFAIL
            if reply is not None:
                expected[(name, result)] = (action, str(reply.code), reply.status)
            elif action in REFUSALS:
                expected[(name, result)] = (action, "—", "—")
    documented: dict[tuple[str, str], tuple[str, str, str]] = {}
    for row in reply_rows():
        check = first_code(row[0])
        if check in CHECKS:
            key = (check, first_code(row[1]))
            assert key not in documented, f"{key} listed twice"
            documented[key] = (first_code(row[2]), row[3], row[4])
    wrong = {key: (documented[key], value) for key, value in expected.items()
             if key in documented and documented[key] != value}
    missing = sorted(set(expected) - set(documented))
    extra = sorted(set(documented) - set(expected))
    assert not (wrong or missing or extra), (
        "docs/reply-codes.md and the checks disagree\n"
        f"missing rows: {missing}\nrows that should not be there: {extra}\n"
        "wrong (documented, expected as action, code, status): " +
        "; ".join(f"{k}: {v[0]} != {v[1]}" for k, v in sorted(wrong.items())))


def test_documented_reply_texts_are_the_checks_words() -> None:
    """The Text column gives, for every refusal a check words itself, exactly the words
    `check-config` shows (the check's own template, capitals for the variable parts)."""
    problems = []
    for row in reply_rows():
        check, result = first_code(row[0]), first_code(row[1])
        if check not in CHECKS or result == "temperror":
            continue
        worded = CHECKS[check].worded.get(Result(result))
        if worded is None:
            continue
        if f"`{worded}`" not in row[5]:
            problems.append(f"{check} {result}: the check words it `{worded}`, not {row[5]}")
    assert not problems, "\n".join(problems)


def test_every_reply_in_the_code_is_documented() -> None:
    rows = reply_rows()
    documented = {(row[3], row[4]) for row in rows if row[3] != "—"}
    in_code = source_replies()
    assert in_code - documented == set(), f"replies not documented: {in_code - documented}"
    assert documented - in_code == set(), f"documented, not in the code: {documented - in_code}"
    general = {(row[3], row[4]) for row in rows if first_code(row[0]) not in CHECKS}
    for reply in (codes.GENERIC_REJECT, codes.GENERIC_TEMPFAIL, codes.DNS_TEMPERROR):
        assert (str(reply.code), reply.status) in general, f"no general row for {reply}"
    assert ("451", "4.3.0") in general, "no row for the internal error"
