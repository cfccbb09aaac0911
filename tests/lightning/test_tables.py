"""The `tables` entry point: runs -> grouped mean ± std, as Markdown, CSV, LaTeX and a plot, with the paper's numbers."""

import csv
import json
import statistics

import pytest
from omegaconf import OmegaConf

from helpers import FAST, compose_config
from lightning_diffusion.lightning.report import make_tables, render, summarize
from lightning_diffusion.lightning.runs import collect
from lightning_diffusion.tables import main
from lightning_diffusion.train import train

ACCURACY = {("l_simple", "linear_betas"): [0.90, 0.94, 0.92], ("min_snr", "linear_betas"): [0.95, 0.97, 0.96],
            ("l_simple", "cosine_betas"): [0.93, 0.91, 0.89]}


def fake_run(run_dir, weighting, schedule, seed, accuracy, paper=None):
    cfg = {"seed": seed, "model": {"weighting": {"_target_": f"lightning_diffusion.core.weightings.{weighting}"},
                                   "process": {"schedule": {"_target_": f"lightning_diffusion.core.processes.{schedule}"}}}}
    if paper:
        cfg["paper"] = paper
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"final/classifier_accuracy": accuracy}))


@pytest.fixture
def runs(tmp_path):
    for (weighting, schedule), values in ACCURACY.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path / "runs" / f"{weighting}-{schedule}-{seed}", weighting, schedule, seed, acc)
    return tmp_path / "runs"


ROWS, COLS = ["model.weighting._target_"], ["model.process.schedule._target_"]


def test_cells_hold_every_seed(runs):
    cells = summarize(collect([runs]), ROWS, COLS, "final/classifier_accuracy")
    assert {k: sorted(v) for k, v in cells.items()} == {k: sorted(v) for k, v in ACCURACY.items()}


def test_csv_has_mean_std_and_count(runs):
    cells = summarize(collect([runs]), ROWS, COLS, "final/classifier_accuracy")
    table = list(csv.DictReader(render(cells, "weighting", "csv").splitlines()))
    by_row = {r["weighting"]: r for r in table}
    values = ACCURACY[("min_snr", "linear_betas")]
    assert float(by_row["min_snr"]["linear_betas mean"]) == pytest.approx(statistics.fmean(values))
    assert float(by_row["min_snr"]["linear_betas std"]) == pytest.approx(statistics.stdev(values))
    assert by_row["min_snr"]["linear_betas n"] == "3" and by_row["min_snr"]["cosine_betas n"] == "0"


def test_markdown_and_latex_render_the_same_cells(runs):
    cells = summarize(collect([runs]), ROWS, COLS, "final/classifier_accuracy")
    md = render(cells, "weighting", "markdown").splitlines()
    assert md[0] == "| weighting | cosine_betas | linear_betas |"
    assert md[3] == "| min_snr | - | 0.96 ± 0.01 (n=3) |"
    tex = render(cells, "weighting", "latex")
    assert r"min\_snr & - & 0.96 $\pm$ 0.01 (n=3) \\" in tex and tex.startswith(r"\begin{tabular}{lrr}")


def test_paper_numbers_become_a_column(tmp_path):
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9, paper={"final/classifier_accuracy": 0.99})
    cells = summarize(collect([tmp_path]), ROWS, [], "final/classifier_accuracy")
    assert cells == {("l_simple", "final/classifier_accuracy"): [0.9], ("l_simple", "paper"): [0.99]}


def test_evaluation_jsons_are_records_with_their_protocol(tmp_path):
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9)
    for nfe, fid in ((10, 30.0), (50, 12.0)):
        (tmp_path / "r0" / f"heun-nfe{nfe}.json").write_text(json.dumps(
            {"metrics": {"fid": fid}, "protocol": {"nfe": nfe, "sampler": {"name": "heun"}}}))
    cells = summarize(collect([tmp_path]), ["protocol.nfe"], ["protocol.sampler.name"], "fid")
    assert cells == {("10", "heun"): [30.0], ("50", "heun"): [12.0]}


def test_entry_point_writes_all_formats(runs, tmp_path, capsys):
    main([str(runs), "--rows", *ROWS, "--cols", *COLS, "--metric", "final/classifier_accuracy",
          "--out", str(tmp_path / "out")])
    for suffix in ("md", "csv", "tex", "png"):
        assert (tmp_path / "out" / f"final_classifier_accuracy.{suffix}").stat().st_size > 0
    assert "| min_snr |" in capsys.readouterr().out


def test_table_and_plot_go_to_wandb(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    make_tables([runs], ROWS, COLS, "final/classifier_accuracy", tmp_path / "out", "acc", wandb_project="tables-test")
    (offline_run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert any(p.suffix == ".wandb" for p in offline_run.iterdir())


def test_bad_requests_name_what_exists(runs, tmp_path):
    with pytest.raises(ValueError, match=r"metric 'fid'.*final/classifier_accuracy"):
        make_tables([runs], ROWS, COLS, "fid", tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        collect([tmp_path / "nowhere"])


def test_a_real_run_is_collected(tmp_path):
    train(compose_config(FAST + ["trainer.max_steps=2"], tmp_path / "run"))
    (record,) = collect([tmp_path])
    assert record["keys"]["model.weighting._target_"] == "lightning_diffusion.core.weightings.l_simple"
    assert 0.0 <= record["metrics"]["final/classifier_accuracy"] <= 1.0 and "train/loss" in record["metrics"]
