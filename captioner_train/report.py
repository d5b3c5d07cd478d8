"""Markdown files that commands write (`--markdown FILE`), so that the tables in the docs are a command's own output.

Every file starts with one line saying where its figures come from: the machine's CPU, the date, the commit (with
"+dirty" when tracked files differ from it), the torch version and the command line that wrote it. Then each table,
after a sentence that says what its columns mean.
"""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the project's checkout, whose commit the header names


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it ("Model name"); every timed figure belongs to that machine."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def git_commit(root: str | Path = ROOT) -> str:
    """The short hash of `root`'s checked-out commit, "+dirty" added when a tracked file differs from it (files git
    does not track do not count, as in `git describe --dirty`); "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def launcher(module: str, processes: int = 1) -> str:
    """How this command was started: `python -m M` (`torchrun --nproc_per_node N -m M` on several processes), M the
    module run as __main__, or `module` when no module was run
    with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None else module
    return f"torchrun --nproc_per_node {processes} -m {name}" if processes > 1 else f"python -m {name}"


def command_line(prog: str, argv: list[str]) -> str:
    """`prog` (how the command is started, e.g. "python -m captioner_train.bench") and its arguments, quoted as a
    shell needs them, so the line can be pasted to run it again."""
    return " ".join([prog, *map(shlex.quote, argv)])


def header(command: str) -> str:
    """The first line of a written file: machine, date (UTC), commit, torch version, command."""
    return (f"Machine: {cpu_name()}; date: {time.strftime('%Y-%m-%d', time.gmtime())}; commit: {git_commit()}; "
            f"torch {torch.__version__}; command: `{command}`")


def markdown(command: str, tables: list[tuple[str, str]]) -> str:
    """The whole file: `header(command)`, then each (sentence saying what the columns mean, Markdown table)."""
    return "\n\n".join([header(command), *(f"{about}\n\n{table}" for about, table in tables)]) + "\n"


def write_markdown(path: str | Path, command: str, tables: list[tuple[str, str]]) -> None:
    """Write `markdown(command, tables)` to `path`, making its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(command, tables))


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text` (separator rows `|---|` left out): how tests read a
    written file back."""
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in text.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
