"""arvision-table <runs>: one paper-style table from every results.json under a folder, or from a study's CSV.

    arvision-table outputs/multirun/…                               # the main metrics and swept values, Markdown
    arvision-table outputs/… --layout var --sort FID                # VAR Table 1: type, model, params, FID, IS, …
    arvision-table outputs/… --rows generator=raster,next_scale --rows data=fashion_mnist --format latex --out t.tex
    arvision-table outputs/… --columns tokenizer,tok.psnr,tok.rfid  # any collected columns
    arvision-table outputs/… --source eval                          # metrics of the latest arvision-eval entry
    arvision-table outputs/… --layout all --format csv --out experiments/<study>/results.csv   # a study's CSV
    arvision-table experiments/<study>/results.csv --layout var     # a table from that CSV

CSV keeps raw values under the collected column names and adds each row's git_sha and command (the arvision-train
call that reruns it), so a CSV reads back as the runs it came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arvision.analysis import LAYOUTS, load, table
from arvision.analysis.collect import skipped_report


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arvision-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="directory searched recursively for results.json, or a CSV written by "
                                     "arvision-table --format csv")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    parser.add_argument("--layout", default="default", choices=sorted(LAYOUTS),
                        help="column set: default (main metrics, and a column per override whose value differs "
                             "between the rows, named by its dotted key), var (VAR Table 1), paradigms, stages, or "
                             "all (every collected column)")
    parser.add_argument("--columns", default=None, help="comma-separated columns (overrides --layout)")
    parser.add_argument("--rows", action="append", default=None, metavar="COLUMN=V1,V2",
                        help="keep rows whose column is one of the values (repeatable; COLUMN!=… excludes)")
    parser.add_argument("--sort", default=None, help="comma-separated sort columns (names or headers); a leading '-' is descending: --sort=-FID")
    parser.add_argument("--source", default="gen", choices=["gen", "eval"],
                        help="generation metrics from the training run (gen) or its latest arvision-eval (eval)")
    parser.add_argument("--evaluations", default="latest", choices=["latest", "rows"],
                        help="latest: one row per run; rows: also one row per arvision-eval entry")
    parser.add_argument("--reference", default=None,
                        help="relative time = time / this row's time (a model, generator or type); default fastest")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    return parser


def render_table(args: argparse.Namespace) -> str:
    """The table the parsed arguments ask for; FileNotFoundError, KeyError or ValueError for a bad request."""
    frame = load(args.root, evaluations=args.evaluations)
    if frame.attrs.get("skipped"):
        print(skipped_report(frame, prog="arvision-table"), file=sys.stderr)
    if frame.empty:
        raise FileNotFoundError(f"no rows in {args.root}" if Path(args.root).suffix == ".csv"
                                else f"no results.json under {args.root}")
    return table(frame, layout=args.columns.split(",") if args.columns else args.layout, rows=args.rows,
                 sort=args.sort, fmt=args.format, source=args.source, reference=args.reference)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        text = render_table(args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"arvision-table: error: {err.args[0] if err.args else err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
    print(text, end="" if text.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
