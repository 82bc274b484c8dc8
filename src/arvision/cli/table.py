"""arvision-table <dir> [--format markdown|latex|csv] [--columns a,b,c]: one table from every run under <dir>."""

from __future__ import annotations

import argparse
import sys

from arvision.analysis import collect, render


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arvision-table", description=__doc__)
    parser.add_argument("root", help="directory searched recursively for results.json")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    parser.add_argument("--columns", default=None, help="comma-separated columns (default: the main metrics)")
    args = parser.parse_args(argv)
    frame = collect(args.root)
    if frame.empty:
        print(f"arvision-table: error: no results.json under {args.root}", file=sys.stderr)
        raise SystemExit(2)
    print(render(frame, columns=args.columns.split(",") if args.columns else None, fmt=args.format))


if __name__ == "__main__":
    main()
