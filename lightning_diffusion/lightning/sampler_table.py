"""Sampler tables: one checkpoint scored with a list of samplers x steps (DDIM's and DPM-Solver's NFE rows, EDM's Heun
on its rho grid), each row an `evaluate` of its own (its JSON with the protocol, in the run's evaluation/ folder),
then one table: a row per sampler, a column per NFE as measured, and the paper's numbers in a "(paper)" row beside.

The table config (conf/table/) lists rows `{sampler: <conf/sampler name>, steps: [...], paper: {steps: value},
overrides: [...], label: ...}`; the model, the metric protocol and the reference are `evaluate`'s.
"""

import json
from pathlib import Path

import lightning as L
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from .artifacts import atomic_write
from .checkpoints import find_run_config
from .evaluation import Evaluation, check_config, evaluate_checkpoint
from .report import metric_legend, render
from .sampling import sampler_label

CORNER = "sampler \\ NFE"


def row_choices(cfg: DictConfig) -> list[dict]:
    """Every (row, steps) of the table as {label, sampler, grid, steps, paper}, the sampler and its grid composed
    as `sampler=<name> grid.steps=<steps>` would (needs an initialised Hydra: the entry point's, or a test's)."""
    rows = cfg.table.get("rows") or []
    if not rows:
        raise ValueError("table.rows is empty: list {sampler: <conf/sampler name>, steps: [...]} rows (conf/table/)")
    choices = []
    for row in rows:
        if not row.get("sampler") or not row.get("steps"):
            raise ValueError(f"table row {OmegaConf.to_container(row)} needs a sampler name and a list of steps")
        for steps in row.steps:
            overrides = [f"sampler={row.sampler}", f"grid.steps={steps}", *row.get("overrides", [])]
            chosen = compose(config_name="sample", overrides=overrides)
            label = row.get("label") or sampler_label(chosen.sampler, chosen.grid)
            paper = (row.get("paper") or {}).get(steps)
            choices.append({"label": label, "sampler": chosen.sampler, "grid": chosen.grid, "steps": steps,
                            "paper": paper})
    return choices


def table_cells(results: list[dict], metric: str) -> dict:
    """{(row label, NFE): per-seed values of `metric`} and {(label + " (paper)", NFE): [paper value]}."""
    cells = {}
    for result in results:
        per_seed = result["per_seed"]
        if metric not in next(iter(per_seed.values())):
            raise ValueError(f"table.metric={metric!r} is not among the evaluated metrics "
                             f"{sorted(next(iter(per_seed.values())))}")
        column = str(result["protocol"]["nfe"])
        cells[(result["label"], column)] = [seed[metric] for seed in per_seed.values()]
        if result["paper"] is not None:
            cells[(f"{result['label']} (paper)", column)] = [float(result["paper"])]
    return cells


def write_table(cells: dict, out: Path, name: str, note: str) -> str:
    """<out>/<name>.md, .csv, .tex (report's renderings); returns the Markdown."""
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        text = render(cells, CORNER, fmt) + (f"\n{note}\n" if note and fmt == "markdown" else "")
        atomic_write(out / f"{name}.{suffix}", lambda tmp, text=text: Path(tmp).write_text(text))
    return render(cells, CORNER, "markdown")


def sampler_table(cfg: DictConfig, choices: list[dict]) -> dict:
    """Evaluate the checkpoint with every choice (one Fabric launch, one reference), write the table (rank 0).

    Returns {cells, path, evaluations} on rank 0, {} elsewhere.
    """
    check_config(cfg)
    if not cfg.ckpt_path:
        raise ValueError("a sampler table scores a checkpoint: give ckpt_path=<run>/checkpoints/<name>.ckpt")
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes)
    fabric.launch()
    evaluation = Evaluation(cfg, fabric)
    results = []
    for choice in choices:
        row_cfg = cfg.copy()
        OmegaConf.set_struct(row_cfg, False)  # a composed config is in struct mode; sampler / grid may be absent
        evaluation.cfg = OmegaConf.merge(row_cfg, {"sampler": choice["sampler"], "grid": choice["grid"]})
        result = evaluate_checkpoint(evaluation)
        if fabric.global_rank == 0:
            saved = json.loads(Path(result["path"]).read_text())
            results.append({**choice, "protocol": saved["protocol"], "per_seed": saved["per_seed"],
                            "path": result["path"]})
    if fabric.global_rank != 0:
        return {}
    cells = table_cells(results, cfg.table.metric)
    out = Path(cfg.table.out_dir) if cfg.table.get("out_dir") else find_run_config(cfg.ckpt_path).parent / "tables"
    note = (f"{cfg.table.metric}, mean ± std over seed sets {list(cfg.seeds)}, {cfg.num_samples} samples each; "
            f"NFE as measured. {cfg.table.get('source') or ''} {metric_legend(cfg.table.metric)}").strip()
    markdown = write_table(cells, out, cfg.table.name, note)
    print(markdown)
    print(f"wrote {out / cfg.table.name}.md, .csv, .tex; the evaluations: {[r['path'] for r in results]}")
    return {"cells": cells, "path": str(out / f"{cfg.table.name}.md"), "evaluations": [r["path"] for r in results]}
