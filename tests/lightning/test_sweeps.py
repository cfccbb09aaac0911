"""W&B sweep files and the offline sweep runner.

Every sweep file is checked twice: against W&B's own sweep schema (the `sweeps` package the W&B server runs), and
against the Hydra config of the entry point its `command:` block runs (each parameter a real override, each legal
value composing and building: weightings evaluate, samplers sample). Then the offline runner draws, runs and
records trials, resumes a preempted one, and runs a three-trial bayes sweep end to end with W&B offline.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import ROOT, compose_config
from lightning_diffusion.lightning import sweep_runner as S
from lightning_diffusion.lightning.builder import build

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
# what our runs log: Lightning's train/val losses (CSV + W&B) and the FinalSamples metrics (metrics.json + W&B)
LOGGED = {"train/loss", "val/loss", "final/classifier_accuracy", "final/nfe", "final/num_samples"}
FLAT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def entry_module(sweep: dict) -> str:
    command = [str(c) for c in sweep.get("command", [])]
    assert "-m" in command, "the command block runs the package's entry point with `${interpreter} -m <module>`"
    return command[command.index("-m") + 1]


def legal_values(spec: dict) -> list:
    """The values a parameter can take that the test can try: its value(s), or a distribution's two ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def hydra_overrides(sweep: dict, params: dict) -> list[str]:
    """The overrides the entry point receives: the command line after `-m <module>`."""
    argv = S.build_command(sweep, params)
    return argv[argv.index(entry_module(sweep)) + 1:]


# ---- the files --------------------------------------------------------------------------------------------------------
def test_there_are_the_sweeps_the_issue_asks_for():
    names = {p.stem for p in SWEEPS}
    assert {"schedule_x_weighting", "min_snr_gamma", "p2_k_gamma", "sigmoid_bias", "sampler_x_nfe"} <= names
    methods = {p.stem: yaml.safe_load(p.read_text())["method"] for p in SWEEPS}
    assert methods["schedule_x_weighting"] == "grid" and methods["sampler_x_nfe"] == "grid"
    assert methods["min_snr_gamma"] == methods["p2_k_gamma"] == methods["sigmoid_bias"] == "bayes"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_passes_wandb_schema(path):
    from sweeps import schema_violations_from_proposed_config

    config = yaml.safe_load(path.read_text())
    assert schema_violations_from_proposed_config(config) == []
    S.load_sweep(path)  # SweepConfig fills and validates too


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_make_clean_overrides(path):
    """Flat dotted names, scalar values with no spaces and no None: what `${args_no_hyphens}` turns into
    `name=value` that Hydra parses as meant."""
    sweep = S.load_sweep(path)
    command = [str(c) for c in sweep["command"]]
    assert "${args_no_hyphens}" in command and "${args}" not in command
    for name, spec in sweep["parameters"].items():
        assert FLAT_NAME.match(name) and "parameters" not in spec, f"{name}: nested or not a flat dotted name"
        for value in legal_values(spec):
            assert value is not None, f"{name}: None becomes the string 'None'"
            assert isinstance(value, (bool, int, float, str)), f"{name}: {value!r} is not a scalar"
            assert not (isinstance(value, str) and re.search(r"\s", value)), f"{name}: {value!r} has spaces"
    if "metric" in sweep or entry_module(sweep) == "lightning_diffusion.train":
        assert sweep["metric"]["name"] in LOGGED, f"{sweep['metric']['name']} is not a metric our runs log"


def combinations(sweep: dict) -> list[dict]:
    names = list(sweep["parameters"])
    return [dict(zip(names, values)) for values in
            itertools.product(*(legal_values(sweep["parameters"][n]) for n in names))]


TRAIN_SWEEPS = [p for p in SWEEPS if entry_module(yaml.safe_load(p.read_text())) == "lightning_diffusion.train"]


@pytest.mark.parametrize("path", TRAIN_SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_is_a_legal_train_config(path, tmp_path):
    """Each combination of legal values composes with the train config and builds; the weighting evaluates to
    finite positive weights and the sampler draws finite samples with the NFE asked for."""
    sweep = S.load_sweep(path)
    sampled = set()
    for params in sorted(combinations(sweep), key=lambda p: p.get("grid.steps", 0)):
        cfg = compose_config(hydra_overrides(sweep, params) + ["logger=csv"], tmp_path)
        for name, value in params.items():  # the override landed where the parameter name says
            if name in ("data", "sampler"):
                continue  # group choices
            node = cfg
            for key in name.split("."):
                node = node[key]
            assert node == value, (name, node, value)
        datamodule, model, trainer = build(cfg)
        t = model.draw_noise_levels(16, torch.Generator().manual_seed(0))
        w = model.weighting(t, model.process)
        assert torch.isfinite(w).all() and (w > 0).all(), params
        if "sampler" in params and params["sampler"] not in sampled:  # each sampler once, at its fewest steps
            sampled.add(params["sampler"])
            labels = torch.arange(2) % max(model.num_classes, 1) if model.num_classes else None
            x, nfe = model.generate(2, labels, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(x).all() and nfe >= params.get("grid.steps", 1) - 1, params


# ---- the runner -------------------------------------------------------------------------------------------------------
def test_command_is_built_as_wandb_agent_builds_it():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"a.b": 1.5, "c": "lightning_diffusion.core.weightings.p2", "d": 3, "e": True}
    ours, theirs = S.command_args(params), create_sweep_command_args({"args": {k: {"value": v} for k, v in
                                                                                params.items()}})
    for macro in ("args", "args_no_hyphens", "args_no_equals", "args_no_boolean_flags", "args_json",
                  "args_append_hydra", "args_override_hydra"):
        assert ours[macro] == theirs[macro], macro
    sweep = {"program": "p.py", "command": ["${env}", "${interpreter}", "-m", "m", "x=1", "${args_no_hyphens}"]}
    assert S.build_command(sweep, params, "py") == ["/usr/bin/env", "py", "-m", "m", "x=1", "a.b=1.5",
                                                     "c=lightning_diffusion.core.weightings.p2", "d=3", "e=True"]
    assert S.build_command({"program": "p.py"}, {"x": 1}, "py") == ["/usr/bin/env", "py", "p.py", "--x=1"]


def test_bayes_draws_see_recorded_metrics(tmp_path):
    """Recorded trials reach the engine with their metric: bayes then fits its Gaussian process to them."""
    sweep = {"method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"x": {"min": 0.0, "max": 1.0}}, "command": ["${env}", "true"]}
    store = S.SweepDir(tmp_path, sweep)
    for i, x in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
        store.save({"name": f"{i:04d}", "params": {"x": x}, "state": "finished", "summary": {"val/loss": (x - 0.3) ** 2}})
    runs = store.sweep_runs(store.trials())
    assert [r.summary_metric("val/loss") for r in runs] == pytest.approx([0.04, 0.0, 0.04, 0.16, 0.36])
    trial = store.claim({"pid": 0})
    assert trial["name"] == "0005" and 0.0 <= trial["params"]["x"] <= 1.0
    assert "success_probability" in trial["search_info"]  # what bayes reports only when it fitted the runs


def test_grid_sweep_runs_each_point_once_then_stops(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"a": {"values": [1, 2]}, "b": {"value": "x"}},
        "command": ["${env}", "${interpreter}", "-c",
                    "import json, pathlib, sys; d = pathlib.Path(sys.argv[-1].split('=', 1)[1]); "
                    "d.mkdir(parents=True, exist_ok=True); a = int(sys.argv[1].split('=')[1]); "
                    "(d / 'metrics.json').write_text(json.dumps({'val/loss': a / 10}))",
                    "${args_no_hyphens}"]}))
    trials = S.run_sweep(config, tmp_path / "sweep", count=5)
    assert [t["params"]["a"] for t in trials] == [1, 2] and all(t["state"] == "finished" for t in trials)
    assert [t["summary"]["val/loss"] for t in trials] == [0.1, 0.2]
    assert json.loads((tmp_path / "sweep" / "0001" / "trial.json").read_text())["command"][-1].startswith("hydra.run.dir=")


def test_preempted_trial_is_resumed_by_the_next_runner(tmp_path):
    """SIGUSR1 to the runner reaches the trial, the trial is marked preempted, and the next runner reruns it in
    the same run directory (where ckpt_path=last finds its checkpoint)."""
    script = ("import json, pathlib, signal, sys, time; d = pathlib.Path(sys.argv[-1].split('=', 1)[1]); "
              "d.mkdir(parents=True, exist_ok=True); first = not (d / 'started').exists(); "
              "signal.signal(signal.SIGUSR1, lambda *a: ((d / 'got_usr1').write_text('x'), sys.exit(3))); "
              "(d / 'started').write_text('x'); "
              "time.sleep(60 if first and 'a=1' in sys.argv else 0); (d / 'metrics.json').write_text(json.dumps({'val/loss': 1.0}))")
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
                                      "parameters": {"a": {"values": [1, 2]}},
                                      "command": ["${env}", "${interpreter}", "-c", script, "${args_no_hyphens}"]}))
    sweep_dir = tmp_path / "sweep"
    runner = subprocess.Popen([sys.executable, "-m", "lightning_diffusion.sweep", "--config", str(config),
                               "--dir", str(sweep_dir), "--count", "2"], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (sweep_dir / "0000" / "started").exists():
        assert time.monotonic() < deadline and runner.poll() is None, "the trial never started"
        time.sleep(0.2)
    runner.send_signal(signal.SIGUSR1)
    assert runner.wait(timeout=60) == 0
    trial = json.loads((sweep_dir / "0000" / "trial.json").read_text())
    assert trial["state"] == "preempted" and (sweep_dir / "0000" / "got_usr1").exists()
    assert not (sweep_dir / "0001").exists()  # a preempted runner draws nothing more

    again = S.run_sweep(config, sweep_dir, count=3)
    assert [(t["name"], t["params"]["a"], t["state"]) for t in again] == [("0000", 1, "finished"),
                                                                         ("0001", 2, "finished")]
    assert again[0]["resumes"] == 1


@pytest.mark.slow
def test_three_trial_bayes_sweep_end_to_end_offline(tmp_path):
    """`python -m lightning_diffusion.sweep` with the real min-SNR sweep, shrunk to a few steps per trial."""
    tiny = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.sample_grid.n=4",
            "callbacks.final_samples.n_per_class=1", "callbacks.checkpoint.every_n_train_steps=2",
            "grid.steps=5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    out = subprocess.run([sys.executable, "-m", "lightning_diffusion.sweep", "--config",
                          str(ROOT / "sweeps" / "min_snr_gamma.yaml"), "--dir", str(tmp_path / "sweep"), "--count",
                          "3", "--", *tiny], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/trial.json"))]
    assert [t["state"] for t in trials] == ["finished"] * 3
    gammas = [t["params"]["model.weighting.gamma"] for t in trials]
    assert len(set(gammas)) == 3 and all(0.5 <= g <= 20.0 for g in gammas)
    for t in trials:
        run_dir = tmp_path / "sweep" / t["name"]
        assert 0.0 <= t["summary"]["final/classifier_accuracy"] <= 1.0 and "train/loss" in t["summary"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["weighting"]["gamma"] == t["params"]["model.weighting.gamma"]
        assert list(run_dir.glob("wandb/offline-run-*")), "W&B ran offline in the trial's run directory"
