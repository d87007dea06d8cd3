"""The CLI reference as Markdown, generated from the parser itself (``docs/cli.md``), so it cannot
drift from the flags: ``python -m clip_triton.cli.reference > docs/cli.md`` rewrites it, and a test
fails when the committed page differs."""

from __future__ import annotations

import argparse

HEADER = """# Command-line reference

Generated from the parser by `python -m clip_triton.cli.reference > docs/cli.md` (a test fails when
this page and the parser disagree). Every flag shows its default; `clip-triton COMMAND --help` prints
the same.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.metavar or action.dest.upper()}`"
    if action.nargs == 0:
        return names
    meta = action.metavar or (action.dest.upper() if action.option_strings else "")
    if action.choices:
        meta = "{" + ",".join(map(str, action.choices)) + "}"
    return f"{names} {meta}".strip() if action.option_strings else names


def _help(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    default = action.default
    if action.option_strings and default not in (None, False, True, argparse.SUPPRESS) and "%(default)" not in text:
        text += f" (default: `{default}`)"
    text = text.replace("%(default)s", str(default))
    return text.replace("|", "\\|")


# Flags whose defaults come from the environment show the built-in default on the page.
ENVIRONMENT_DEFAULTS = ("CLIP_TRITON_URL", "CLIP_TRITON_TOKENIZER_DIR")


def render() -> str:
    import os  # noqa: PLC0415

    from . import build_parser  # noqa: PLC0415

    saved = {name: os.environ.pop(name) for name in ENVIRONMENT_DEFAULTS if name in os.environ}
    try:
        parser = build_parser()
    finally:
        os.environ.update(saved)
    out = [HEADER]
    commands = _subparsers(parser)
    out.append("| command | what it does |\n| --- | --- |")
    for name, sub in commands.items():
        out.append(f"| [`{name}`](#{name}) | {' '.join((sub.description or '').split())} |")
    for name, sub in commands.items():
        out.append(f"\n## {name}\n\n{' '.join((sub.description or '').split())}\n")
        out.append(f"```text\n{sub.format_usage().strip()}\n```\n")
        rows = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if rows:
            out.append("| argument | meaning |\n| --- | --- |")
            out.extend(f"| {_flag(a)} | {_help(a)} |" for a in rows)
        if sub.epilog:
            out.append(f"\n{sub.epilog.strip()}\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
