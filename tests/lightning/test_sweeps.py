"""W&B sweep files and the offline sweep runner.

Every sweep file is checked twice: against W&B's own sweep schema (the `sweeps` package the W&B server runs), and
against the Hydra config of the entry point its `command:` block runs (each parameter a real override, each legal
value composing and building: weightings evaluate, samplers sample). Then the offline runner draws, runs and
records trials, resumes a preempted one, stops after failing first trials, and runs every sweep command of the
README as written (one trial each, a few steps) with W&B offline.
"""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import ROOT, compose_config
from lightning_diffusion.lightning import sweep_runner as S
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.checkpoints import link_latest

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


def test_trial_json_records_every_override_and_the_latest_link_is_not_a_trial(tmp_path, monkeypatch):
    """The command, the overrides after `--` and the job's own (LIGHTNING_DIFFUSION_OVERRIDES) are in trial.json,
    written before the trial runs; `<dir>/latest` (the train entry's link to the run it trained) is no trial."""
    script = ("import json, os, pathlib, sys; d = pathlib.Path(sys.argv[-1].split('=', 1)[1]); "
              "d.mkdir(parents=True, exist_ok=True); (d.parent / 'latest').symlink_to(d.name); "
              "(d / 'metrics.json').write_text(json.dumps({'seen': os.environ['LIGHTNING_DIFFUSION_OVERRIDES']}))")
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"method": "grid", "parameters": {"a": {"values": [1, 2]}},
                                      "command": ["${env}", "${interpreter}", "-c", script, "${args_no_hyphens}"]}))
    monkeypatch.setenv(S.JOB_OVERRIDES, "trainer=slurm 'model.optimizer.lr=0.002'")
    (first,) = S.run_sweep(config, tmp_path / "sweep", count=1, overrides=["trainer.max_steps=4"])
    saved = json.loads((tmp_path / "sweep" / "0000" / "trial.json").read_text())
    assert saved["overrides"] == ["trainer.max_steps=4"]
    assert saved["job_overrides"] == ["trainer=slurm", "model.optimizer.lr=0.002"]
    assert saved["command"][-2:] == ["trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'sweep' / '0000'}"]
    assert saved["summary"]["seen"] == "trainer=slurm 'model.optimizer.lr=0.002'"  # the trial's environment has it
    store = S.SweepDir(tmp_path / "sweep", yaml.safe_load(config.read_text()))
    assert [t["name"] for t in store.trials()] == ["0000"] and (tmp_path / "sweep" / "latest").is_symlink()


def test_a_runner_whose_first_trials_all_fail_stops(tmp_path, monkeypatch, capsys):
    """wandb agent's rule: after WANDB_AGENT_MAX_INITIAL_FAILURES failed trials in a row from the start, stop."""
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"method": "grid", "parameters": {"a": {"values": list(range(10))}},
                                      "command": ["${env}", "${interpreter}", "-c", "import sys; sys.exit(2)",
                                                  "${args_no_hyphens}"]}))
    monkeypatch.setenv("WANDB_AGENT_MAX_INITIAL_FAILURES", "2")
    trials = S.run_sweep(config, tmp_path / "sweep", count=10)
    assert [t["state"] for t in trials] == ["failed", "failed"] and trials[0]["returncode"] == 2
    assert "the first 2 trials failed, stopping" in capsys.readouterr().out
    monkeypatch.delenv("WANDB_AGENT_MAX_INITIAL_FAILURES")
    assert S.max_initial_failures() == 5  # wandb agent's default


# ---- the README's sweep commands, as written -------------------------------------------------------------------
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=16",
        "network.channels=16",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.sample_grid.n=4",
        "callbacks.final_samples.n_per_class=1", "callbacks.checkpoint.every_n_train_steps=2", "grid.steps=5"]
# what each README command is shrunk to (a sweep's --count becomes 1): every sweep file the README names needs one
BUDGET = {"train": TINY, "weightings_digits": TINY, "schedule_x_weighting": TINY, "min_snr_gamma": TINY,
          "sampler_x_nfe": ["network.channels=16", "callbacks.final_samples.n_per_class=1"], "posthoc_ema": []}


def readme_sweep_lines() -> list[str]:
    """The README's command lines that run or read a sweep, in order."""
    lines = [line.split("  #")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()]
    return [line for line in lines if line.startswith("python -m lightning_diffusion.")
            and ("lightning_diffusion.sweep " in line or "tables runs/sweeps/" in line)]


def shrunk(argv: list[str]) -> tuple[list[str], Path | None, str | None]:
    """(the command at a small budget, the sweep directory it fills, its sweep file's stem) for one README command."""
    module, args = argv[2], argv[3:]
    if module == "lightning_diffusion.train":
        extra = ["callbacks.posthoc_ema.snapshot_every=2"] if "callbacks=posthoc_ema" in args else []
        return [sys.executable, "-m", module, *args, *BUDGET["train"], *extra], None, None
    if module != "lightning_diffusion.sweep":
        return [sys.executable, "-m", module, *args], None, None
    stem = Path(args[args.index("--config") + 1]).stem
    args = [*args, *([] if "--" in args else ["--"]), *BUDGET[stem]]
    args[args.index("--count") + 1] = "1"
    directory = Path(args[args.index("--dir") + 1]) if "--dir" in args else Path("runs", "sweeps", stem)
    return [sys.executable, "-m", module, *args], directory, stem


@pytest.mark.slow
def test_readme_sweep_commands_run_as_written(tmp_path):
    """Every README line that runs a sweep (and the tables of one), from a fresh working directory, one trial each
    at a few steps: the offline runner end to end, the sampler sweep on the run the line trained (runs/<name>/latest),
    the post-hoc EMA sweep on a run with snapshots."""
    lines = readme_sweep_lines()
    assert len([line for line in lines if "lightning_diffusion.sweep " in line]) >= 5, lines
    (tmp_path / "sweeps").symlink_to(ROOT / "sweeps")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))} | {"PYTHONWARNINGS": "ignore"}
    for line in lines:
        for part in line.split("&&"):
            argv, directory, stem = shrunk(shlex.split(part))
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, (part, out.stdout[-3000:], out.stderr[-3000:])
            if directory is None:
                continue
            (trial,) = [json.loads(p.read_text()) for p in sorted((tmp_path / directory).glob("*/trial.json"))
                        if not p.parent.is_symlink()]
            assert trial["state"] == "finished", (part, trial)
            metric = (yaml.safe_load((ROOT / "sweeps" / f"{stem}.yaml").read_text()).get("metric") or {}).get("name")
            assert metric is None or metric in trial["summary"], (part, trial["summary"])
    assert (tmp_path / "runs" / "ddpm-digits" / "latest" / "posthoc_ema").is_dir()
    assert list((tmp_path / "runs" / "ddpm-digits" / "latest" / "checkpoints").glob("posthoc_ema-sigma_rel*.ckpt"))
    assert list((tmp_path / "tables").glob("*.md"))


def test_latest_points_only_at_full_runs_of_the_default_layout(tmp_path, monkeypatch):
    """Issue 23, item 17: `debug=fast` re-pointed runs/ddpm-digits/latest (which sweep files read) at a 20-step toy,
    and `hydra.run.dir=/a/b/x` wrote /a/b/latest."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "ddpm-digits"
    for name in ("full", "toy"):
        (runs / name).mkdir(parents=True)
    (tmp_path / "a" / "b" / "x").mkdir(parents=True)
    assert link_latest(compose_config([], runs / "full")) == runs / "latest"
    assert (runs / "latest").resolve() == (runs / "full").resolve()
    assert link_latest(compose_config(["debug=fast"], runs / "toy")) is None
    assert (runs / "latest").resolve() == (runs / "full").resolve()
    assert link_latest(compose_config([], tmp_path / "a" / "b" / "x")) is None
    assert not (tmp_path / "a" / "b" / "latest").exists()
