"""Does the suite catch a broken rule? Apply one wrong one-line change at a time (`scripts/mutations.py`: a rule
README states about maps, decoding, settings, limits, uploads, collections or the page) to a copy of the project,
run the default-suite tests named for it, and print a Markdown row per change: the first test that failed, or NOT
CAUGHT (with why, for a change known to be equivalent).

    .venv/bin/python scripts/mutate.py                       # every change (about 20 minutes on 2 cores)
    .venv/bin/python scripts/mutate.py 3 4                   # only changes 3 and 4 (their index in the list)
    .venv/bin/python scripts/mutate.py --list                # the changes and their indices, running nothing
    .venv/bin/python scripts/mutate.py --markdown docs/MUTATIONS.md   # also write the table, with machine and commit
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mutations import MUTATIONS, Mutation  # this script's folder is on sys.path

SRC = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "runs", ".hypothesis")


def python() -> str:
    """The project's own venv interpreter when it has one, else the one running this script."""
    venv = SRC / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SRC, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SRC, capture_output=True,
                           text=True).stdout.strip()
    return (run.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def apply(m: Mutation, root: Path) -> None:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name!r}: its old text occurs {text.count(m.old)} times in {m.path}, not once; "
                         "scripts/mutations.py must follow the code (tests/test_mutations.py says the same)")
    path.write_text(text.replace(m.old, m.new))


def run_one(m: Mutation, work: Path) -> tuple[str, bool | None]:
    """-> (the table's verdict, True caught / False not caught / None the tests could not run)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(SRC, work, ignore=IGNORE)
    apply(m, work)
    r = subprocess.run([python(), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests], cwd=work,
                       capture_output=True, text=True)
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in r.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if r.returncode == 0:
        return "NOT CAUGHT" + (f": {m.survives}" if m.survives else ""), False
    if r.returncode in (1, 2) and failed:  # 1: a test failed; 2: interrupted by a collection error (import fails)
        return f"caught by `{failed[0]}`", True
    tail = " ".join((r.stdout + r.stderr).split())[-300:]
    return f"TESTS DID NOT RUN (pytest exit {r.returncode}): {tail}", None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("only", nargs="*", type=int, help="indices of the changes to make (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the table, with a header naming CPU, date and commit")
    parser.add_argument("--list", action="store_true", help="print the changes with their indices and stop")
    args = parser.parse_args()
    if args.list:
        for i, m in enumerate(MUTATIONS):
            print(f"{i:3d}  {m.path:26s} {m.name}")
        return 0
    chosen = [(i, MUTATIONS[i]) for i in args.only] if args.only else list(enumerate(MUTATIONS))
    command = "python scripts/mutate.py " + " ".join(sys.argv[1:])
    header = (f"`{command.strip()}` on {cpu_name()} ({os.cpu_count()} CPUs), {datetime.date.today().isoformat()}, "
              f"commit {commit()}")
    table = [header, "", "| # | change | file | caught by / NOT CAUGHT |", "|---|---|---|---|"]
    print("\n".join(table), flush=True)
    counts = {True: 0, False: 0, None: 0}
    with tempfile.TemporaryDirectory(prefix="captioner-mutant-") as tmp:
        for i, m in chosen:
            verdict, caught = run_one(m, Path(tmp) / "project")
            counts[caught] += 1
            row = f"| {i} | {m.name} | `{m.path}` | {verdict} |"
            table.append(row)
            print(row, flush=True)
    total = f"{counts[True]} of {len(chosen)} changes caught, {counts[False]} not caught" + \
        (f", {counts[None]} whose tests did not run" if counts[None] else "")
    table += ["", total]
    print("\n" + total)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if counts[None] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
