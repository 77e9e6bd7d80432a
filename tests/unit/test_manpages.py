"""The manual pages are generated from the parser and docs/configuration.md, render without a
groff warning, and carry every command, option and configuration key."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailwarden.cli import build_parser
from mailwarden.devtools.manpages import command_page, config_page

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.skipif(shutil.which("groff") is None,
                                reason="groff is not installed (Debian: groff-base)")


def rendered(source: str, tmp_path: Path) -> str:
    page = tmp_path / "page"
    page.write_text(source)
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-c", "-P-b", "-P-u", "-rLL=200n",
                           "-rHY=0", str(page)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


def test_the_command_page_has_every_command_and_option(tmp_path: Path) -> None:
    text = rendered(command_page(build_parser()), tmp_path)
    todo = [("", build_parser())]
    leaves = 0
    while todo:
        path, parser = todo.pop()
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for group in groups:
            todo += [(f"{path} {name}".strip(), sub) for name, sub in group.choices.items()]
        if not groups:
            leaves += 1
            assert re.search(rf"^   {re.escape(path)}$", text, re.M), path
        flat = " ".join(text.split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            for option in action.option_strings:
                assert option in text, option
            if action.help and not isinstance(action, argparse._SubParsersAction):
                said = " ".join(action.help.replace("%%", "%").split())[:40]
                assert said.replace("`", "") in flat, (path, said)
    assert leaves >= 12
    assert "EXIT STATUS" in text and "SIGHUP" in text


def test_the_configuration_page_has_every_key(tmp_path: Path) -> None:
    text = rendered(config_page(CONFIGURATION), tmp_path)
    keys = re.findall(r"^\| `([a-z_][^`]*)` \|", CONFIGURATION, re.M)
    assert len(keys) > 80
    missing = [key for key in keys if key not in text]
    assert not missing, missing
    assert "enhanced status" in text or "5.7." in text  # the check sections came along
