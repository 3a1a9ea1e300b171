"""mkdocs hook: the CLI reference is generated from cellcontrast's argparse parser at build
time, so the page cannot drift from the commands (tests/docs compares the two)."""

from __future__ import annotations

import argparse
import html
import re

MARKER = "<!-- cli-reference -->"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order `--help` lists them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def _text(text: object) -> str:
    """Help text as Markdown: `<` `>` escaped outside code spans (`<name>.h5ad` is not HTML)."""
    parts = re.split(r"(`[^`]*`)", str(text).replace("\n", " "))
    return "".join(p if p.startswith("`") else html.escape(p, quote=False) for p in parts)


def _cell(text: object) -> str:
    return _text(text).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or action.default == []:
        return ""
    return f"`{action.default}`"


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        flags = ", ".join(f"`{s}`" for s in action.option_strings)
        takes_value = action.nargs != 0
        return f"{flags} {action.metavar or action.dest.upper()}" if takes_value else flags
    return f"`{action.metavar or action.dest}`"


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The documented actions of one parser: its positionals and options, not `--help`."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    if parser is None:
        from cellcontrast.cli.parser import build_parser

        parser = build_parser()
    out = [f"`{parser.prog} [--version] COMMAND ...`: {parser.description}", ""]
    for name, help_text, sub in _subcommands(parser):
        out += [f"## {parser.prog} {name}", "", _text(help_text[:1].upper() + help_text[1:]) + ".", "",
                "```text", sub.format_usage().replace("usage: ", "").strip(), "```", "",
                "| argument | default | what it does |", "|---|---|---|"]
        out += [f"| {_name(a)} | {_default(a)} | {_cell(a.help or '')} |" for a in options(sub)]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, cli_markdown()) if MARKER in markdown else markdown
