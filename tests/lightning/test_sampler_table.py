"""The sampler table of one checkpoint on the digits (offline: digits-cnn): every sampler x steps evaluated with its
protocol, and one Markdown / CSV / LaTeX table with the NFE as measured and the paper row beside."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from helpers import CONF, FAST, compose_config, entry_point_env
from lightning_diffusion.lightning.sampler_table import row_choices, sampler_table
from lightning_diffusion.train import train
from test_metrics import digits_cnn_weights

pytestmark = pytest.mark.usefixtures("one_thread")
FD = "fd_digits-cnn"
ROWS = [{"sampler": "ddim", "steps": [2, 4], "paper": {4: 1.25}}, {"sampler": "heun", "steps": [2, 3]},
        {"sampler": "ddim", "steps": [3], "overrides": ["sampler.eta=1.0"], "label": "ddim eta=1"}]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 20-step class-conditional DDPM (T = 50, a narrow U-Net, no warm-up) on the digits: enough that the samplers
    disagree (an untrained, zero-output network makes every deterministic sampler return the same scaled noise)."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    overrides = [o for o in FAST if not o.startswith(("callbacks.sample_grid.n", "callbacks.final_samples."))]
    train(compose_config(overrides + ["trainer.max_steps=20", "model.lr_warmup_steps=0", "model.process.T=50",
                                      "grid.steps=10", "network.channels=16", "callbacks.sample_grid=null",
                                      "callbacks.final_samples=null"], run_dir))
    return run_dir


def table_overrides(run_dir, tmp_path, *extra):
    return [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "logger=csv", "feature_extractor=digits-cnn",
            f"feature_extractor_weights_path={digits_cnn_weights()}", f"cache_dir={tmp_path / 'cache'}",
            "metrics=[fid]", "num_samples=30", "batch_size=15", "seeds=[0,1]", "progress=false",
            f"out_dir={tmp_path / 'evaluation'}", f"table.out_dir={tmp_path / 'tables'}", "table.name=t", *extra]


def test_the_table_has_a_row_per_sampler_and_a_column_per_measured_nfe(digits_run, tmp_path):
    cfg = compose_config(table_overrides(digits_run, tmp_path), config_name="sampler_table")
    cfg.table.rows = OmegaConf.create(ROWS)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        choices = row_choices(cfg)
    assert [(c["label"], c["steps"]) for c in choices] == [("ddim-uniform", 2), ("ddim-uniform", 4),
                                                            ("heun-karras", 2), ("heun-karras", 3), ("ddim eta=1", 3)]
    result = sampler_table(cfg, choices)
    # NFE as measured: DDIM one per step, Heun 2 steps - 1 (no correction on the step to sigma = 0)
    evaluations = [json.loads(Path(p).read_text()) for p in result["evaluations"]]
    assert [e["protocol"]["nfe"] for e in evaluations] == [2, 4, 3, 5, 3]
    assert evaluations[4]["protocol"]["sampler"]["eta"] == 1.0
    with open(tmp_path / "tables" / "t.csv") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], {r[0]: r[1:] for r in rows[1:]}
    assert header[0] == "sampler \\ NFE" and [h.split()[0] for h in header[1::3]] == ["2", "3", "4", "5"]
    assert set(body) == {"ddim-uniform", "ddim-uniform (paper)", "ddim eta=1", "heun-karras"}
    column = {nfe: i for i, nfe in enumerate(h.split()[0] for h in header[1::3])}
    ddim_4 = body["ddim-uniform"][3 * column["4"]: 3 * column["4"] + 3]
    per_seed = [s[FD] for s in evaluations[1]["per_seed"].values()]
    assert float(ddim_4[0]) == pytest.approx(sum(per_seed) / 2) and ddim_4[2] == "2"  # mean over the 2 seed sets
    assert len({float(body[r][3 * column["3"]]) for r in ("heun-karras", "ddim eta=1")}) == 2  # rows not mixed up
    assert body["ddim-uniform (paper)"][3 * column["4"]] == "1.25" and body["heun-karras"][3 * column["2"]] == ""
    markdown = (tmp_path / "tables" / "t.md").read_text()
    assert markdown.startswith("| sampler \\ NFE | 2 | 3 | 4 | 5 |") and "NFE as measured" in markdown
    assert (tmp_path / "tables" / "t.tex").read_text().startswith(r"\begin{tabular}")


def test_bad_tables_are_refused_before_sampling(digits_run, tmp_path):
    cfg = compose_config(table_overrides(digits_run, tmp_path), config_name="sampler_table")
    cfg.table.rows = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), pytest.raises(ValueError,
                                                                                         match="table.rows is empty"):
        row_choices(cfg)
    cfg.table.rows = OmegaConf.create([{"sampler": "ddim"}])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), pytest.raises(ValueError,
                                                                                         match="needs a sampler name"):
        row_choices(cfg)
    cfg.table.metric = "fid"  # digits-cnn's Frechet distance is fd_digits-cnn: never called fid
    cfg.table.rows = OmegaConf.create([{"sampler": "ddim", "steps": [2]}])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        choices = row_choices(cfg)
    with pytest.raises(ValueError, match=r"table.metric='fid' is not among the evaluated metrics \['fd_digits-cnn'\]"):
        sampler_table(cfg, choices)


@pytest.mark.slow
def test_the_entry_point_writes_the_table(digits_run, tmp_path):
    rows = "table.rows=[{sampler: ddim, steps: [2]}, {sampler: dpm_solver_pp_2m, steps: [3]}]"
    command = [sys.executable, "-m", "lightning_diffusion.sampler_table", *table_overrides(digits_run, tmp_path), rows]
    done = subprocess.run(command, cwd=tmp_path, env=entry_point_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (tmp_path / "tables" / "t.md").read_text()
    assert markdown.startswith("| sampler \\ NFE | 2 | 3 |") and "| ddim-uniform |" in markdown
