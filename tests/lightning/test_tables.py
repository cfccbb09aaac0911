"""The `tables` entry point: runs -> grouped mean ± std, as Markdown, CSV, LaTeX and a plot, with the paper's numbers."""

import csv
import json
import statistics

import pytest
from omegaconf import OmegaConf

from helpers import FAST, compose_config
from lightning_diffusion.lightning.report import make_tables, metric_legend, render, summarize
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
        path = tmp_path / "out" / f"final_classifier_accuracy-by-model.weighting-x-model.process.schedule.{suffix}"
        assert path.stat().st_size > 0
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


def fake_evaluation(run_dir, name, fid, seeds=(0,), **protocol):
    (run_dir / f"{name}.json").write_text(json.dumps({"metrics": {"fid": fid}, "protocol": {
        "nfe": 10, "num_samples": 500, "seeds": list(seeds), "sampler_label": "heun-karras",
        "sampler": {"_target_": "lightning_diffusion.core.samplers.pf_ode", "solver": {"_target_": "heun"}},
        **protocol}}))


def test_a_key_no_result_has_is_refused_naming_the_keys_they_have(tmp_path):
    """Issue 23, item 12: `--cols protocol.sampler.name` (no result file has it) put every sampler in one column."""
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9)
    fake_evaluation(tmp_path / "r0", "heun", 30.0)
    fake_evaluation(tmp_path / "r0", "ddim", 40.0, sampler_label="ddim-uniform",
                    sampler={"_target_": "lightning_diffusion.core.samplers.ddim"})
    with pytest.raises(ValueError, match=r"no result has the key 'protocol.sampler.name'.*'protocol.sampler._target_'"):
        summarize(collect([tmp_path]), ["protocol.nfe"], ["protocol.sampler.name"], "fid")
    cells = summarize(collect([tmp_path]), ["protocol.nfe"], ["protocol.sampler_label"], "fid")
    assert cells == {("10", "heun-karras"): [30.0], ("10", "ddim-uniform"): [40.0]}


def test_only_seeds_of_one_protocol_are_averaged(tmp_path):
    """Issue 23, item 12: results with 500 and 200 samples (or two samplers) were averaged as if they were seeds."""
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9)
    fake_evaluation(tmp_path / "r0", "a", 30.0, seeds=[0])
    fake_evaluation(tmp_path / "r0", "b", 32.0, seeds=[1])  # another seed set of the same protocol: pooled
    fake_run(tmp_path / "r1", "l_simple", "linear_betas", 1, 0.9)  # another training seed: pooled too
    fake_evaluation(tmp_path / "r1", "a", 34.0, seeds=[0])
    assert summarize(collect([tmp_path]), ["protocol.nfe"], [], "fid") == {("10", "fid"): [30.0, 32.0, 34.0]}
    fake_evaluation(tmp_path / "r1", "c", 60.0, num_samples=200)
    with pytest.raises(ValueError, match=r"different protocols.*protocol.num_samples: 500 vs 200.*--rows or --cols"):
        summarize(collect([tmp_path]), ["protocol.nfe"], [], "fid")
    cells = summarize(collect([tmp_path]), ["protocol.nfe"], ["protocol.num_samples"], "fid")
    assert cells == {("10", "500"): [30.0, 32.0, 34.0], ("10", "200"): [60.0]}


def test_runs_trained_otherwise_are_not_pooled(tmp_path):
    """Issue 23, item 12: training runs that differ in more than the seed (here the steps) are not one protocol."""
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9)
    fake_run(tmp_path / "r1", "l_simple", "linear_betas", 1, 0.8)
    cfg = OmegaConf.load(tmp_path / "r1" / "config.yaml")
    cfg.trainer = {"max_steps": 300}
    OmegaConf.save(cfg, tmp_path / "r1" / "config.yaml")
    with pytest.raises(ValueError, match=r"trainer.max_steps: '<absent>' vs 300"):
        summarize(collect([tmp_path]), ROWS, [], "final/classifier_accuracy")


def test_tables_of_one_metric_by_other_keys_do_not_overwrite_each_other(runs, tmp_path):
    """Issue 23, item 19: every table of a metric was <out>/<metric>.*, so the next one overwrote it."""
    for rows, cols in ((ROWS, COLS), (COLS, ROWS)):
        main([str(runs), "--rows", *rows, "--cols", *cols, "--metric", "final/classifier_accuracy",
              "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.md")) == [
        "final_classifier_accuracy-by-model.process.schedule-x-model.weighting.md",
        "final_classifier_accuracy-by-model.weighting-x-model.process.schedule.md"]


def test_the_table_says_what_kd_cs_and_fd_mean_and_why_kid_can_be_negative(tmp_path):
    """Issue 23, item 19: KID came out negative (-1.09) with no word on why, nor on the `kd_` / `cs_` names."""
    fake_run(tmp_path / "r0", "l_simple", "linear_betas", 0, 0.9)
    (tmp_path / "r0" / "e.json").write_text(json.dumps({"metrics": {"kd_digits-cnn_mean": -1.09}, "protocol": {"nfe": 4}}))
    markdown = make_tables([tmp_path], ["protocol.nfe"], [], "kd_digits-cnn_mean", tmp_path / "out", "t")
    assert "kd_digits-cnn: kernel distance (KID's formula" in markdown and "slightly negative" in markdown
    assert "not Inception's" in (tmp_path / "out" / "t.md").read_text()
    assert "classifier score" in metric_legend("cs_digits-cnn_mean") and "Frechet" in metric_legend("fd_digits-cnn")
    assert metric_legend("final/classifier_accuracy") == ""
