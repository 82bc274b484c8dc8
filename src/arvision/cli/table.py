"""arvision-table <dir>: one paper-style table from every results.json under <dir>.

    arvision-table outputs/multirun/…                               # the main metrics, Markdown
    arvision-table outputs/… --layout var --sort FID                # VAR Table 1: type, model, params, FID, IS, …
    arvision-table outputs/… --rows generator=raster,next_scale --rows data=fashion_mnist --format latex --out t.tex
    arvision-table outputs/… --columns tokenizer,tok.psnr,tok.rfid  # any collected columns
    arvision-table outputs/… --source eval                          # metrics of the latest arvision-eval entry
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arvision.analysis import LAYOUTS, collect, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arvision-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="directory searched recursively for results.json")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    parser.add_argument("--layout", default="default", choices=sorted(LAYOUTS),
                        help="column set: default (main metrics) or var (VAR Table 1)")
    parser.add_argument("--columns", default=None, help="comma-separated columns (overrides --layout)")
    parser.add_argument("--rows", action="append", default=None, metavar="COLUMN=V1,V2",
                        help="keep rows whose column is one of the values (repeatable; COLUMN!=… excludes)")
    parser.add_argument("--sort", default=None, help="comma-separated sort columns (names or headers); a leading '-' is descending: --sort=-FID")
    parser.add_argument("--source", default="gen", choices=["gen", "eval"],
                        help="generation metrics from the training run (gen) or its latest arvision-eval (eval)")
    parser.add_argument("--reference", default=None,
                        help="relative time = time / this row's time (a model, generator or type); default fastest")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        frame = collect(args.root)
    except FileNotFoundError as err:
        print(f"arvision-table: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if frame.empty:
        print(f"arvision-table: error: no results.json under {args.root}", file=sys.stderr)
        raise SystemExit(2)
    try:
        text = table(frame, layout=args.columns.split(",") if args.columns else args.layout, rows=args.rows,
                     sort=args.sort, fmt=args.format, source=args.source, reference=args.reference)
    except (KeyError, ValueError) as err:
        print(f"arvision-table: error: {err.args[0] if err.args else err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
    print(text, end="" if text.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
