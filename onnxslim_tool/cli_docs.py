"""The CLI reference, generated from the typer app so it cannot drift from the code.

`python -m onnxslim_tool.cli_docs > docs/cli.md` regenerates it; a test fails when the
committed file differs from what the app says.
"""

from __future__ import annotations

from typing import Any

import typer

from onnxslim_tool.cli import app


def cli_reference() -> str:
    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the command definitions by `python -m onnxslim_tool.cli_docs > docs/cli.md`.",
        "",
        "Exit codes: `0` success; `1` bad input or a refusal (one line on stderr); `2` the accuracy "
        "budget could not be met; `130` interrupted.",
        "",
    ]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        lines += _command(name, command)
    return "\n".join(lines).rstrip() + "\n"


def _is_argument(param: Any) -> bool:
    # typer vendors its own click: test by kind, not by class
    return getattr(param, "param_type_name", "") == "argument"


def _command(name: str, command: Any) -> list[str]:
    args = " ".join(p.name.upper() for p in command.params if _is_argument(p))
    lines = [f"## `{' '.join(['onnxslim-tool', name, *([args] if args else [])])}`", ""]
    if command.help:
        paragraphs = _paragraphs(command.help)
        lines += [" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs]
        lines.append("")
    arguments = [p for p in command.params if _is_argument(p)]
    if arguments:
        lines += [f"- `{p.name.upper()}`: {p.help or ''}" for p in arguments] + [""]
    options = [p for p in command.params if not _is_argument(p) and p.name != "help"]
    if options:
        lines += ["| option | default | what it does |", "|---|---|---|"]
        for option in options:
            flags = ", ".join(f"`{o}`" for o in option.opts)
            plain = option.is_flag or option.default is None or option.default == ()
            default = "" if plain else f"`{option.default}`"
            text = (option.help or "").replace("|", "\\|")
            lines.append(f"| {flags} | {default} | {text} |")
        lines.append("")
    return lines


def _paragraphs(text: str) -> list[str]:
    parts = [p for p in text.strip().split("\n\n") if p.strip()]
    out = []
    for part in parts:
        out += [part, ""]
    return out[:-1]


if __name__ == "__main__":
    print(cli_reference(), end="")
