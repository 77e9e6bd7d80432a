"""The manual pages, generated so that they cannot drift: mailwarden(8) from the command
line's own parser (every command, its description with the exit status, every option with its
default), mailwarden.yaml(5) from docs/configuration.md (every key table).

    python -m mailwarden.devtools.manpages OUTDIR [--configuration docs/configuration.md]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from mailwarden import __version__
from mailwarden.cli.common import DEFAULT_CONFIG

DATE = "2026-12-07"


def roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, inline Markdown turned into
    fonts (`code` bold), links into their text."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", text)
    return "".join(ch if ch.isascii() else f"\\[u{ord(ch):04X}]" for ch in text)


def lines(text: str) -> str:
    """Roff source lines: none may start with a control character."""
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _commands(parser: argparse.ArgumentParser, path: str
              ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from _commands(sub, f"{path} {name}".strip())


def _option(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
        if action.nargs == 0:
            return names
        metavar = action.metavar or (action.choices and "{" + ",".join(map(str, action.choices))
                                     + "}") or action.dest.upper()
        return f"{names} \\fI{roff(str(metavar))}\\fR"
    return f"\\fI{roff(str(action.metavar or action.dest))}\\fR"


def command_page(parser: argparse.ArgumentParser) -> str:
    """mailwarden(8)."""
    out = [f'.TH MAILWARDEN 8 "{DATE}" "mailwarden {__version__}" "System Administration"',
           ".SH NAME", "mailwarden \\- mail\\-authentication milter (SPF, DKIM, DMARC, ARC) and "
           "its tools", ".SH SYNOPSIS", "\\fBmailwarden\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION", lines(roff(parser.description or "")), ".SH COMMANDS"]
    for path, sub in _commands(parser, ""):
        out += [".SS " + roff(path), lines(roff(sub.description or "")), ".TP",
                "\\fBusage:\\fR " + roff(" ".join(sub.format_usage().split()[1:]))]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out += [".TP", _option(action), lines(roff((action.help or "").replace("%%", "%")))]
    out += [".SH FILES", ".TP", f"\\fI{DEFAULT_CONFIG}\\fR",
            "The configuration, see \\fBmailwarden.yaml\\fR(5).", ".TP",
            "\\fI/var/lib/mailwarden\\fR", "The DMARC store of the default configuration.",
            ".SH SIGNALS", ".TP", "\\fBSIGHUP\\fR",
            "Reload the configuration; a broken one is refused and the running one kept.", ".TP",
            "\\fBSIGTERM\\fR", "Stop taking connections, finish those in progress within "
            "\\fBdrain_timeout\\fR, exit.",
            ".SH EXIT STATUS", "0 done; 1 what was checked failed; 2 a usage or configuration "
            "error; 75 a DNS lookup failed for now. Each command above gives its own.",
            ".SH SEE ALSO", "\\fBmailwarden.yaml\\fR(5), \\fBpostconf\\fR(5), \\fBsystemctl\\fR(1)"]
    return "\n".join(out) + "\n"


def _blocks(markdown: str) -> Iterator[tuple[str, list[str]]]:
    """The Markdown document as (kind, lines) blocks: heading, code, table, list item,
    paragraph."""
    kind, block = "", []
    for line in markdown.splitlines():
        if kind == "code" and not line.startswith("```"):
            block.append(line)
            continue
        if line.startswith("- ") or line.startswith(("#", "```")) or not line.strip() or (
                kind in ("table", "paragraph") and line.startswith("|") != (kind == "table")):
            if kind:
                yield kind, block
            closing = kind == "code"
            kind, block = "", []
            if line.startswith("```") and not closing:
                kind = "code"
            elif line.startswith("#"):
                yield "heading", [line]
            elif line.startswith("- "):
                kind, block = "list", [line[2:]]
            if not line.startswith("|"):
                continue
        if not kind:
            kind = "table" if line.startswith("|") else "paragraph"
        block.append(line)
    if kind:
        yield kind, block


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def config_page(markdown: str) -> str:
    """mailwarden.yaml(5): the whole reference, its key tables as tagged paragraphs."""
    out = [f'.TH MAILWARDEN.YAML 5 "{DATE}" "mailwarden {__version__}" "File Formats"',
           ".SH NAME", "mailwarden.yaml \\- mailwarden configuration file", ".SH DESCRIPTION"]
    for kind, block in _blocks(markdown.split("\n", 1)[1]):
        text = " ".join(line.strip() for line in block)
        if kind == "heading":
            level, title = re.match(r"(#+)\s*(.*)", block[0]).groups()  # type: ignore[union-attr]
            out.append((".SH " + roff(title.upper())) if len(level) == 2 else
                       (".SS " + roff(title)))
        elif kind == "paragraph":
            out += [".PP", lines(roff(text))]
        elif kind == "list":
            out += [".IP \\(bu 2", lines(roff(text))]
        elif kind == "code":
            out += [".PP", ".nf", lines(roff("\n".join(block))), ".fi"]
        else:  # a table: the first column tags each row, the others follow, named
            header = _cells(block[0])
            for row in (_cells(line) for line in block[2:]):
                rest = "; ".join(f"{name}: {cell}" for name, cell in zip(header[1:-1], row[1:-1],
                                                                         strict=False))
                body = f"{rest}. {row[-1]}" if rest else row[-1]
                out += [".TP", roff(row[0]), lines(roff(body))]
    out += [".SH SEE ALSO", "\\fBmailwarden\\fR(8)"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mailwarden.cli import build_parser

    args = argparse.ArgumentParser(description="Write mailwarden.8 and mailwarden.yaml.5.")
    args.add_argument("outdir", type=Path)
    args.add_argument("--configuration", type=Path,
                      default=Path(__file__).resolve().parents[3] / "docs" / "configuration.md")
    ns = args.parse_args(argv)
    ns.outdir.mkdir(parents=True, exist_ok=True)
    (ns.outdir / "mailwarden.8").write_text(command_page(build_parser()))
    markdown = ns.configuration.read_text(encoding="utf-8")
    (ns.outdir / "mailwarden.yaml.5").write_text(config_page(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
