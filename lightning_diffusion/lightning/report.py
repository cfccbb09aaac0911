"""Paper tables from finished runs (`python -m lightning_diffusion.tables`).

Every run directory under RUNS (its config.yaml, CSV log and metrics.json) is one record, and every evaluation JSON
in it (`evaluate`'s {metrics, protocol}) one more, with the protocol's fields as `protocol.*` keys (e.g.
`protocol.sampler_label`, `protocol.nfe`, `protocol.num_samples`). Records are grouped by the row and column keys (dotted config paths;
`_target_` values shortened to their last name) and the metric is reported as mean ± std over each group (the
seeds): a key no result has is refused, and so is a group whose results differ in anything but their seeds (sampler,
number of samples, training steps, ...), so that different protocols are never averaged as if they were seeds. An experiment config's `paper.<metric>`
(conf/experiment/) becomes a "paper" column beside ours.
Writes <out>/<name>.md, .csv, .tex and .png (the metric per row, one series per column, error bars = std), and
with --wandb PROJECT logs the table and the plot as a W&B run.
"""

import csv
import difflib
import io
import statistics
from pathlib import Path

from .artifacts import atomic_write
from .plots import save_effective_weighting_plot
from .runs import collect, read_effective_weighting
from .tracking import wandb_offline


def label(record_keys: dict, keys: list[str]) -> str:
    """The values at `keys`, joined; a `_target_` path shortened to its last name."""
    def short(key):
        value = record_keys.get(key, "-")
        return value.rsplit(".", 1)[-1] if key.endswith("_target_") and isinstance(value, str) else str(value)
    return ", ".join(short(k) for k in keys)


# what may differ between the results one cell averages: the seeds, and what names one run (its checkpoint, folder)
SEED_KEYS = ("seed", "protocol.seeds", "protocol.aggregate")
RUN_KEYS = ("run_dir", "protocol.checkpoint", "protocol.checkpoint_sha256")


def check_keys(records: list[dict], keys: list[str]) -> None:
    """Refuse a row or column key that none of the results has, naming it and the keys they do have."""
    have = sorted({k for r in records for k in r["keys"]})
    for key in keys:
        if key in have:
            continue
        head = key.split(".", 1)[0] + "."
        near = difflib.get_close_matches(key, have, n=5, cutoff=0.6)
        related = [k for k in have if k.startswith(head)] if "." in key else []
        varying = [k for k in have if len({repr(r["keys"].get(k)) for r in records}) > 1]
        shown = near or related or varying
        raise ValueError(f"no result has the key {key!r}: " + (
            f"keys they have that are close: {shown[:40]}" if shown else f"their keys: {have[:40]}")
            + (f" ({len(have)} in all)" if len(have) > 40 else ""))


def protocol_of(record: dict) -> dict:
    """The record's keys that must agree for it to pool with others: all but its seeds and the names of its run
    (a key set to null counts as absent: an option added to the configs later, off, as in runs written before)."""
    run_dir = str(record["run_dir"])
    return {k: v for k, v in record["keys"].items() if v is not None
            and k not in SEED_KEYS and k not in RUN_KEYS and not (isinstance(v, str) and run_dir in v)}


def check_one_protocol(cell: tuple[str, str], group: list[dict]) -> None:
    """A cell averages seeds of one protocol: results differing in anything else are refused, naming the keys."""
    first = protocol_of(group[0])
    for record in group[1:]:
        other = protocol_of(record)
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k, "<absent>") != other.get(k, "<absent>"))
        if differ:
            shown = ", ".join(f"{k}: {first.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}" for k in differ[:6])
            raise ValueError(f"the cell {cell} would average results of different protocols ({group[0]['run_dir']} "
                             f"and {record['run_dir']} differ in {shown}{' ...' if len(differ) > 6 else ''}): "
                             f"only seeds are averaged; add the keys that differ to --rows or --cols, or give "
                             f"fewer runs")


def summarize(records: list[dict], rows: list[str], cols: list[str], metric: str) -> dict:
    """{(row label, column label): values of `metric`}, plus a 'paper' column from `paper.<metric>`.

    Each cell is the mean over seeds of one protocol: a key no result has, or a cell that would pool results differing
    in anything but their seeds (sampler, samples, steps, ...) is refused.
    """
    scored = [r for r in records if metric in r["metrics"]]
    if not scored:
        found = sorted({k for r in records for k in r["metrics"]})
        raise ValueError(f"none of the {len(records)} records has the metric {metric!r}; metrics found: {found}")
    check_keys(scored, [*rows, *cols])
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in scored:
        groups.setdefault((label(record["keys"], rows), label(record["keys"], cols) if cols else metric),
                          []).append(record)
    cells: dict[tuple[str, str], list[float]] = {}
    for cell, group in groups.items():
        check_one_protocol(cell, group)
        cells[cell] = [float(r["metrics"][metric]) for r in group]
        paper = group[0]["keys"].get(f"paper.{metric}")
        if paper is not None:
            cells[(cell[0], "paper")] = [float(paper)]
    return cells


def cell_text(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g} (n={len(values)})"


def grid(cells: dict) -> tuple[list[str], list[str]]:
    rows = sorted({r for r, _ in cells}, key=natural)
    cols = sorted({c for _, c in cells if c != "paper"}, key=natural)
    return rows, cols + (["paper"] if any(c == "paper" for _, c in cells) else [])


def natural(text: str):
    """Sort '2' before '10': numbers by value, then text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def text_rows(cells: dict, rows: list[str], cols: list[str]) -> list[list[str]]:
    return [[cell_text(cells[(r, c)]) if (r, c) in cells else "-" for c in cols] for r in rows]


def render(cells: dict, corner: str, fmt: str) -> str:
    """The table as 'markdown', 'csv' (mean, std, n columns per cell) or 'latex' (booktabs)."""
    rows, cols = grid(cells)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([corner] + [f"{c} {part}" for c in cols for part in ("mean", "std", "n")])
        for r in rows:
            line = [r]
            for c in cols:
                values = cells.get((r, c), [])
                line += ([statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else "", len(values)]
                         if values else ["", "", 0])
            writer.writerow(line)
        return buffer.getvalue()
    text = text_rows(cells, rows, cols)
    if fmt == "markdown":
        lines = ["| " + " | ".join([corner, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += ["| " + " | ".join([r, *t]) + " |" for r, t in zip(rows, text)]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        def tex(s):
            return s.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")
        lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
                 " & ".join(tex(s) for s in [corner, *cols]) + r" \\", r"\midrule"]
        lines += [" & ".join(tex(s) for s in [r, *t]) + r" \\" for r, t in zip(rows, text)]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    raise ValueError(f"format {fmt!r}: accepted 'markdown', 'csv', 'latex'")


def plot(cells: dict, corner: str, metric: str, path: Path) -> Path:
    """The metric against the rows, one series per column (mean, error bars = std); numeric rows on a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid(cells)
    numeric = all(natural(r)[0] == 0 for r in rows)
    x = [float(r) for r in rows] if numeric else list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.5))
    for i, c in enumerate(cols):
        pts = [(xi, cells[(r, c)]) for xi, r in zip(x, rows) if (r, c) in cells]
        means = [statistics.fmean(v) for _, v in pts]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
        shift = 0.0 if numeric else (i - (len(cols) - 1) / 2) * 0.8 / max(len(cols), 1)
        ax.errorbar([p[0] + shift for p in pts], means, yerr=stds, label=c, marker="o", capsize=3,
                    linestyle="-" if numeric else "none")
    if not numeric:
        ax.set_xticks(x, rows, rotation=30, ha="right")
    ax.set_xlabel(corner)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_weightings(records: list[dict], rows: list[str], path: Path) -> Path | None:
    """The effective weighting of each row's first run, overlaid (None when no run wrote one)."""
    curves, grid = {}, None
    for record in records:
        row = label(record["keys"], rows)
        saved = read_effective_weighting(record["run_dir"]) if row not in curves else None
        if saved is not None:
            grid, density, product = saved
            curves[row] = (density, product)
    if not curves:
        return None
    return save_effective_weighting_plot(path, grid, curves, f"effective weightings by {', '.join(rows)}")


def log_to_wandb(project: str, cells: dict, corner: str, name: str, png: Path) -> None:
    """The table and its plot as one W&B run (offline by itself without a key or a network: `wandb sync` later)."""
    import wandb

    rows, cols = grid(cells)
    run = wandb.init(project=project, name=f"table-{name}", job_type="tables", dir=str(png.parent),
                     mode="offline" if wandb_offline() else "online")
    table = wandb.Table(columns=[corner, *cols], data=[[r, *t] for r, t in zip(rows, text_rows(cells, rows, cols))])
    run.log({name: table, f"{name}_plot": wandb.Image(str(png))})
    run.finish()


def metric_legend(metric: str) -> str:
    """What a metric's name means, for the line under a table: FID / KID / IS in Inception's features, or the same
    formulas in another extractor's (`fd_`, `kd_`, `cs_`, lightning.metrics.fidelity), and why KID can be < 0."""
    name = metric.split("/")[-1]
    for suffix in ("_mean", "_std", "_min", "_max"):
        name = name.removesuffix(suffix)
    kid = ("an unbiased estimate of the squared MMD (cubic polynomial kernel) averaged over subsets, Binkowski et "
           "al. 2018: the true value is >= 0, but being unbiased the estimate is slightly negative when the two sets "
           "are close (a value within a few kid_std of 0 is 'indistinguishable')")
    if name == "fid":
        return "fid: Frechet Inception Distance (Inception-v3 pool features, lower is better)."
    if name == "kid":
        return f"kid: Kernel Inception Distance, {kid}."
    if name == "is":
        return "is: Inception Score (higher is better)."
    for prefix, what in (("fd_", "Frechet distance (FID's formula, lower is better)"),
                         ("kd_", f"kernel distance (KID's formula: {kid})"),
                         ("cs_", "classifier score (the Inception Score's formula, higher is better)")):
        if name.startswith(prefix):
            return (f"{name}: {what} in the features of the `{name[len(prefix):]}` extractor, not Inception's: not "
                    f"comparable with FID / KID / IS numbers of papers.")
    return ""


def table_name(rows: list[str], cols: list[str], metric: str) -> str:
    """The default file stem of a table, from what it shows: `<metric>-by-<rows>[-x-<cols>]` (`_target_` dropped,
    `/` as `_`), so tables of one metric by other keys never overwrite each other."""
    def keys(dotted):
        return "+".join(k.removesuffix("._target_") for k in dotted)
    return f"{metric.replace('/', '_')}-by-{keys(rows)}" + (f"-x-{keys(cols)}" if cols else "")


def make_tables(roots, rows: list[str], cols: list[str], metric: str, out: Path, name: str,
                wandb_project: str | None = None) -> str:
    """Write <out>/<name>.{md,csv,tex,png} (and log them to W&B if a project is given); returns the Markdown."""
    records = collect(roots)
    cells = summarize(records, rows, cols, metric)
    corner = ", ".join(k.removesuffix("._target_").rsplit(".", 1)[-1] for k in rows) or "run"
    legend = metric_legend(metric)
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        text = render(cells, corner, fmt) + (f"\n{legend}\n" if legend and fmt == "markdown" else "")
        atomic_write(out / f"{name}.{suffix}", lambda tmp, text=text: Path(tmp).write_text(text))
    png = plot(cells, corner, metric, out / f"{name}.png")
    weightings = plot_weightings(records, rows, out / f"{name}_effective_weighting.png")
    if weightings is not None:
        print(f"wrote {weightings}: the effective weightings of the rows, overlaid")
    if wandb_project:
        log_to_wandb(wandb_project, cells, corner, name, png)
    return render(cells, corner, "markdown") + (f"\n{legend}\n" if legend else "")
