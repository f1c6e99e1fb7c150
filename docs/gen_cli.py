"""Write the CLI reference (docs/cli.md) from the click commands of `onnx_neq.cli.main`.

    python docs/gen_cli.py > docs/cli.md

For each command: its usage, its help text, its arguments and a table of its options (flags, type or
choices, default, help). Nothing depends on the terminal: the text comes from the click objects as
written, never through click's help formatter (which wraps to the terminal's width), the one-line
summaries are cut at a fixed length, and commands come in the order cli.py registers them.
tests/test_docs.py fails when docs/cli.md differs from this output.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout without an install

from onnx_neq.cli import main as CLI  # noqa: E402

PROG = "onnx-neq"
SUMMARY_LIMIT = 200  # characters of a command's one-line summary (click's default depends on nothing either)
COMMAND = "python docs/gen_cli.py > docs/cli.md"


def _unset(value) -> bool:
    return value is None or type(value).__name__ == "Sentinel"  # click >= 8.3 marks "no default" with UNSET


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`"


def _help(command: click.Command) -> str:
    text = inspect.cleandoc(command.help or "").split("\f")[0]
    return "\n".join(line for line in text.splitlines() if line.strip() != "\b").strip()


def _range(info: dict) -> str:
    low, high = info.get("min"), info.get("max")
    parts = []
    if low is not None:
        parts.append(f"{'>' if info.get('min_open') else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if info.get('max_open') else '<='} {high}")
    return ", ".join(parts)


def _type(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    info = param.type.to_info_dict()
    kind = info.get("param_type")
    if kind == "Choice":
        text = " \\| ".join(_code(choice) for choice in info["choices"])
    elif kind in ("IntRange", "FloatRange"):
        text = f"{'integer' if kind == 'IntRange' else 'number'} {_range(info)}"
    elif kind == "Path":
        text = "file" if not info.get("dir_okay") else "directory" if not info.get("file_okay") else "path"
    else:
        text = {"String": "text", "Int": "integer", "Float": "number", "Bool": "boolean"}.get(kind, info.get("name", kind))
    if getattr(param, "multiple", False):
        text += ", repeatable"
    return text


def _default(param: click.Option) -> str:
    if param.required:
        return "required"
    default = param.default
    if callable(default):
        return "computed"
    if param.is_flag:
        if param.secondary_opts:
            return _code(param.opts[0] if default else param.secondary_opts[0])
        return "on" if default else "off"
    if _unset(default) or default == () or default == []:
        return ""
    if isinstance(default, (list, tuple)):
        return ", ".join(_code(item) for item in default)
    return _code(default)


def _flags(param: click.Option) -> str:
    flags = ", ".join(_code(opt) for opt in param.opts)
    if param.secondary_opts:
        flags += " / " + ", ".join(_code(opt) for opt in param.secondary_opts)
    return flags


def _usage(name: str, command: click.Command) -> str:
    pieces = [name, "[OPTIONS]"]
    if isinstance(command, click.Group):
        pieces.append("COMMAND [ARGS]...")
    for param in command.params:
        if isinstance(param, click.Argument):
            text = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(text if param.required else f"[{text}]")
    return " ".join(pieces)


def _arguments(command: click.Command) -> list[str]:
    rows = []
    for param in command.params:
        if isinstance(param, click.Argument):
            needs = "required" if param.required else "optional"
            many = ", one or more" if param.nargs == -1 else ""
            rows.append(f"- `{param.name.upper()}`: {_type(param)} ({needs}{many})")
    return rows


def _options(command: click.Command) -> list[str]:
    rows = ["| option | type | default | help |", "|---|---|---|---|"]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            rows.append(f"| {_flags(param)} | {_type(param)} | {_default(param)} | {_cell(param.help or '')} |")
    return rows if len(rows) > 2 else []


def _section(level: str, name: str, command: click.Command) -> list[str]:
    lines = [f"{level} {name}", "", "```", f"Usage: {_usage(name, command)}", "```", ""]
    if _help(command):
        lines += [_help(command), ""]
    if _arguments(command):
        lines += ["Arguments:", "", *_arguments(command), ""]
    if _options(command):
        lines += [*_options(command), ""]
    return lines


def render() -> str:
    lines = [
        "# Command-line reference",
        "",
        f"Generated from the click commands of `onnx_neq/cli.py` by `docs/gen_cli.py`; do not edit by hand. Regenerate with `{COMMAND}`",
        "(tests/test_docs.py fails when this file is stale). Every command also takes `--help`.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, command in CLI.commands.items():
        if not command.hidden:
            short = command.get_short_help_str(limit=SUMMARY_LIMIT)
            lines.append(f"| [`{PROG} {name}`](#{_anchor(PROG + ' ' + name)}) | {_cell(short)} |")
    lines.append("")
    lines += _section("##", PROG, CLI)
    for name, command in CLI.commands.items():
        if not command.hidden:
            lines += _section("##", f"{PROG} {name}", command)
            for sub_name, sub in getattr(command, "commands", {}).items():  # a group's commands (fleet simulate, ...)
                lines += _section("###", f"{PROG} {name} {sub_name}", sub)
    return "\n".join(lines).rstrip() + "\n"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading made of letters, digits, spaces and hyphens."""
    return "-".join(heading.lower().split())


if __name__ == "__main__":
    sys.stdout.write(render())
