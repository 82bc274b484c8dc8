"""README tables generated from committed CSVs, so that no table in the repository is pasted by hand.

A generated table sits between two HTML comments; the opening one holds the `arvision-table` command that renders
it (Markdown, paths relative to the repository root):

    <!-- table: arvision-table experiments/flexvar_steps/results.csv --evaluations rows --columns … -->
    | … the table that command prints … |
    <!-- /table -->

    python -m arvision.analysis.readme README.md experiments/*/README.md           # regenerate in place
    python -m arvision.analysis.readme --check README.md experiments/*/README.md   # exit 1 if any differs

Run it from the repository root (with no file arguments it takes README.md and experiments/*/README.md there).
A table whose CSV is not committed renders as one line saying so, so a number can only get into a README table
through a CSV. Tables that are not run records (e.g. a parity harness's measurements) use `csv <path>` as the
command: the CSV's cells, as written, under its header.
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

BLOCK = re.compile(r"<!-- table: (?P<command>(?:arvision-table|csv) [^\n]*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)


@dataclass(frozen=True)
class Block:
    command: str
    body: str
    start: int  # of the body
    end: int


def blocks(text: str) -> list[Block]:
    return [Block(m["command"], m["body"], m.start("body"), m.end("body")) for m in BLOCK.finditer(text)]


def render_csv(path: Path) -> str:
    """A CSV's cells as a Markdown table, unchanged (a `|` in a cell is escaped)."""
    with open(path, newline="") as handle:
        rows = [[cell.replace("|", "\\|") for cell in row] for row in csv.reader(handle)]
    if not rows:
        raise ValueError(f"{path} is empty")
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def render_command(command: str) -> str:
    """The Markdown table an `arvision-table …` (or `csv <path>`) marker command prints (ValueError for a command
    that cannot)."""
    from arvision.cli.table import parser, render_table

    argv = shlex.split(command)[1:]
    if command.startswith("csv "):
        if len(argv) != 1:
            raise ValueError(f"a csv table names one file: {command}")
        path = Path(argv[0])
        return render_csv(path) if path.is_file() else f"*No table yet: `{path}` is not in the repository.*"
    try:
        args = parser().parse_args(argv)
    except SystemExit:
        raise ValueError(f"not a valid arvision-table command: {command}") from None
    if args.format != "markdown" or args.out:
        raise ValueError(f"a README table is Markdown printed to stdout: drop --format/--out from {command}")
    if Path(args.root).suffix == ".csv" and not Path(args.root).is_file():
        return f"*No table yet: `{args.root}` is not in the repository.*"
    try:
        return render_table(args)
    except (FileNotFoundError, KeyError) as err:
        raise ValueError(f"{command}: {err.args[0] if err.args else err}") from None


def update(path: str | Path, *, check: bool = False) -> list[str]:
    """Regenerate every table block of a Markdown file (unless `check`); the commands whose table differed."""
    path = Path(path)
    text = path.read_text()
    stale, pieces, last = [], [], 0
    for block in blocks(text):
        body = render_command(block.command).rstrip("\n") + "\n"
        if body != block.body:
            stale.append(block.command)
        pieces += [text[last:block.start], body]
        last = block.end
    if stale and not check:
        path.write_text("".join(pieces) + text[last:])
    return stale


def default_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted(root.glob("experiments/*/README.md"))] if p.is_file()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m arvision.analysis.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="Markdown files (default: README.md and experiments/*/README.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files] or default_files(Path.cwd())
    differs = False
    for path in files:
        try:
            stale = update(path, check=args.check)
        except ValueError as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        for command in stale:
            differs = True
            print(f"{path}: {'differs from' if args.check else 'regenerated'}: {command}")
    if args.check and differs:
        print("regenerate with: python -m arvision.analysis.readme " + " ".join(map(str, files)), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
