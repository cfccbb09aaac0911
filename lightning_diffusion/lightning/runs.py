"""Reading finished runs back: each run directory's config, CSV history and metrics, and the evaluations inside it."""

import contextlib
import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoints import CONFIG_NAME


def read_metrics(run_dir: Path) -> tuple[list[dict], dict]:
    """(history, summary) of a run: the rows of its CSV log and, as summary, each metric's last value there
    updated with `metrics.json` (the `final/*` metrics)."""
    history, summary = [], {}
    log = run_dir / "csv" / "metrics.csv"
    if log.is_file():
        with log.open() as f:
            for row in csv.DictReader(f):
                values = {}
                for key, text in row.items():
                    with contextlib.suppress(TypeError, ValueError):
                        if math.isfinite(value := float(text)):
                            values[key] = value
                if values:
                    history.append(values)
                    summary.update(values)
    if (run_dir / "metrics.json").is_file():
        summary.update(json.loads((run_dir / "metrics.json").read_text()))
    return history, summary


def flatten(tree, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def collect(roots) -> list[dict]:
    """{'keys': config (+ protocol), 'metrics': ..., 'run_dir': ...}: one per run directory and one per evaluation JSON
    inside it."""
    records = []
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give run directories or folders that hold them")
        for config in sorted(root.rglob(CONFIG_NAME)):
            run_dir = config.parent
            cfg = flatten(OmegaConf.to_container(OmegaConf.load(config)))
            _, summary = read_metrics(run_dir)
            records.append({"keys": cfg, "metrics": summary, "run_dir": run_dir})
            for path in sorted(run_dir.rglob("*.json")):
                result = json.loads(path.read_text())
                if isinstance(result, dict) and {"metrics", "protocol"} <= result.keys():
                    records.append({"keys": {**cfg, **flatten(result["protocol"], "protocol.")},
                                    "metrics": result["metrics"], "run_dir": run_dir})
    return records


def read_effective_weighting(run_dir: Path) -> tuple[list[float], list[float], list[float]] | None:
    """(logsnr, density, effective) from the run's effective_weighting.csv (EffectiveWeightingPlot), if it wrote one."""
    path = Path(run_dir) / "effective_weighting.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return ([float(r["logsnr"]) for r in rows], [float(r["density"]) for r in rows],
            [float(r["effective"]) for r in rows])
