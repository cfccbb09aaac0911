"""Paper tables from finished runs: `python -m lightning_diffusion.tables RUNS... --rows KEY --cols KEY --metric NAME`.

Writes <out>/<name>.md, .csv, .tex and .png (mean ± std over seeds, a "paper" column from `paper.<metric>`; the
name <metric>-by-<rows>[-x-<cols>] unless --name), and with --wandb PROJECT logs them as a W&B run
(`lightning.report`).
"""

import argparse
from pathlib import Path

from .lightning.report import make_tables, table_name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (searched recursively)")
    parser.add_argument("--rows", nargs="+", required=True, help="dotted keys labelling the rows")
    parser.add_argument("--cols", nargs="*", default=[], help="dotted keys labelling the columns (none: one column)")
    parser.add_argument("--metric", required=True, help="e.g. final/classifier_accuracy, fid, bits_per_dim")
    parser.add_argument("--out", type=Path, default=Path("tables"), help="folder for .md/.csv/.tex/.png")
    parser.add_argument("--name", default=None,
                        help="file name stem (default: <metric>-by-<rows>[-x-<cols>], so tables never overwrite "
                             "each other)")
    parser.add_argument("--wandb", metavar="PROJECT", default=None, help="also log table and plot to this W&B project")
    args = parser.parse_args(argv)
    name = args.name or table_name(args.rows, args.cols, args.metric)
    print(make_tables(args.runs, args.rows, args.cols, args.metric, args.out, name, args.wandb))
    print(f"wrote {args.out}/{name}.md, .csv, .tex, .png")


if __name__ == "__main__":
    main()
