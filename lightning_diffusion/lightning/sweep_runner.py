"""Offline W&B sweeps, for compute nodes with no route to the W&B server (`python -m lightning_diffusion.sweep`).

Each trial's parameters are drawn by W&B's own open-source sweep engine (the `sweeps` package: grid, random and
bayes, and its schema check), the command line is built from the file's `command:` block the way `wandb agent`
builds it (`${args_no_hyphens}` -> `name=value`), and the entry point runs with W&B offline in the trial's own run
directory `<dir>/<trial>/` (extra overrides after `--` are appended to every trial). Its metrics (CSV logs and
`metrics.json`) are recorded in `<dir>/<trial>/trial.json`, so later draws (bayes) see them.

Every trial also gets the job's own overrides, LIGHTNING_DIFFUSION_OVERRIDES (the sbatch scripts set it, e.g.
`trainer=slurm`, so a trial trains on the allocation's devices): the entry points append it to their command line,
under the runner as under `wandb agent`, and trial.json records them with the rest of the command.

Several runners (the elements of a SLURM job array) may share one `--dir`: drawing and recording hold a file lock.
SIGUSR1 / SIGTERM (preemption) are forwarded to the running trial, which is marked `preempting`; unless it then
finishes, it stays `preempted` and the next runner to start resumes it first, in the same run directory
(`ckpt_path=last`), where `wandb agent` would hand its configuration to another agent as a new run.
"""

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .progress import progress_bar
from .runs import read_metrics

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb agent's default
JOB_OVERRIDES = "LIGHTNING_DIFFUSION_OVERRIDES"
RESUMABLE = ("preempting", "preempted")


ENGINE_INSTALL = "pip install --no-deps sweeps==0.3.0 (its requirements jsonschema and jsonref come with lightning_diffusion)"


def sweep_engine():
    """W&B's open-source sweep engine, the `sweeps` package, or an error naming the command that installs it.

    It pins numpy < 2 but runs with numpy 2, hence `--no-deps`, with its requirements among ours. Where it is missing,
    a folder named `sweeps/` (this repository's sweep files) would import as an empty namespace package: that is
    refused by name too.
    """
    try:
        import sweeps
    except ImportError as err:  # the engine itself, or what it imports (jsonschema, jsonref, pydantic)
        raise ModuleNotFoundError(f"W&B's sweep engine cannot be imported ({err}): {ENGINE_INSTALL}") from err
    if getattr(sweeps, "__file__", None) is None:
        raise ModuleNotFoundError(f"`import sweeps` found only the folder {list(sweeps.__path__)} (sweep files), not "
                                  f"W&B's sweep engine: {ENGINE_INSTALL}")
    return sweeps


def load_sweep(path) -> dict:
    """The sweep file, checked against W&B's sweep schema (raises jsonschema.ValidationError listing violations)."""
    config = yaml.safe_load(Path(path).read_text())
    sweep_engine().SweepConfig(config)  # validates; the unfilled dict is what the W&B server stores too
    return config


def command_args(params: dict[str, Any]) -> dict[str, list[str]]:
    """The argument macros of `wandb agent` for a trial's parameters {name: value}."""
    pairs = [f"{name}={value}" for name, value in params.items()]  # str(value), as the agent formats it
    return {
        "args": [f"--{p}" for p in pairs],
        "args_no_hyphens": pairs,
        "args_no_equals": [x for name, value in params.items() for x in (f"--{name}", str(value))],
        "args_no_boolean_flags": [f"--{name}" if value is True else f"--{name}={value}"
                                  for name, value in params.items() if value is not False],
        "args_json": [json.dumps(params)],
        "args_append_hydra": [f"+{p}" for p in pairs],
        "args_override_hydra": [f"++{p}" for p in pairs],
    }


def build_command(sweep: dict, params: dict[str, Any], interpreter: str = sys.executable) -> list[str]:
    """The argv `wandb agent` would run for `params`: each `${macro}` item of `command:` expands to a list."""
    macros = command_args(params) | {"env": ["/usr/bin/env"], "interpreter": [interpreter],
                                     "program": [sweep["program"]] if sweep.get("program") else []}
    argv = []
    for item in sweep.get("command") or DEFAULT_COMMAND:
        item = str(item)
        if item.startswith("${envvar:") and item.endswith("}"):
            argv.append(os.environ.get(item[9:-1], item[9:-1]))
        elif item.startswith("${") and item.endswith("}"):
            if item[2:-1] not in macros:
                raise ValueError(f"unknown macro {item} in the sweep's command block")
            argv += macros[item[2:-1]]
        else:
            argv.append(item)
    return argv


class SweepDir:
    """The trials of one offline sweep: `<dir>/sweep.yaml`, `<dir>/<NNNN>/trial.json`, guarded by `<dir>/.lock`."""

    def __init__(self, directory, sweep: dict):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sweep = sweep
        saved = self.dir / "sweep.yaml"
        with self.lock():
            if not saved.exists():
                saved.write_text(yaml.safe_dump(sweep, sort_keys=False))
            elif yaml.safe_load(saved.read_text()) != sweep:
                raise ValueError(f"{self.dir} holds a different sweep ({saved}); use another --dir")

    @contextlib.contextmanager
    def lock(self):
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def trials(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*/trial.json"))
                if not p.parent.is_symlink()]  # <dir>/latest is the newest trial again

    def save(self, trial: dict) -> None:
        path = self.dir / trial["name"] / "trial.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(trial, indent=1))
        tmp.replace(path)

    def sweep_runs(self, trials: list[dict]):
        """The trials as the engine's SweepRun objects (state, config, metric history and summary)."""
        state = {"preempting": "preempted"}
        return [sweep_engine().SweepRun(name=t["name"], state=state.get(t["state"], t["state"]),
                         config={k: {"value": v} for k, v in t["params"].items()},
                         history=t.get("history", []), summary_metrics=t.get("summary", {})) for t in trials]

    def claim(self, owner: dict) -> dict | None:
        """The next trial to run: a preempted one first, else a new draw; None when the sweep is exhausted."""
        with self.lock():
            trials = self.trials()
            resumable = [t for t in trials if t["state"] in RESUMABLE]
            if resumable:
                trial = resumable[0] | {"resumes": resumable[0].get("resumes", 0) + 1}
            else:
                run = sweep_engine().next_run(self.sweep, self.sweep_runs(trials))
                if run is None:
                    return None
                trial = {"name": f"{len(trials):04d}", "params": {k: v["value"] for k, v in run.config.items()},
                         "search_info": run.search_info}
            trial |= {"state": "running", "owner": owner, "started": time.time()}
            self.save(trial)
            return trial

    def record(self, trial: dict) -> None:
        trial["history"], trial["summary"] = read_metrics(self.dir / trial["name"])
        with self.lock():
            self.save(trial)


class TrialProcess:
    """Runs one trial's command, forwarding preemption signals to it and noting that they came."""

    FORWARD = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, argv: list[str], env: dict, log: Path, on_preempt):
        self.argv, self.env, self.log, self.on_preempt = argv, env, log, on_preempt
        self.preempted, self.proc = False, None

    def _forward(self, signum, _frame):
        if not self.preempted:
            self.preempted = True
            self.on_preempt()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in self.FORWARD}
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("a") as out:
                out.write(f"$ {' '.join(self.argv)}\n")
                out.flush()
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
                while True:
                    try:
                        return self.proc.wait()
                    except InterruptedError:  # pragma: no cover - wait() retries by itself on PEP 475 pythons
                        continue
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def job_overrides(consume: bool = False) -> list[str]:
    """The job's overrides for every run it starts (LIGHTNING_DIFFUSION_OVERRIDES, shell-quoted); `consume` removes
    the variable, so that processes the run starts (Lightning's DDP ranks re-run its command line) do not add them
    twice."""
    text = os.environ.pop(JOB_OVERRIDES, "") if consume else os.environ.get(JOB_OVERRIDES, "")
    return shlex.split(text)


def trial_env(trial_dir: Path) -> dict:
    """The trial's environment: W&B offline (the point of this runner), no leftover sweep/agent variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")}
    return env | {"WANDB_MODE": "offline", "WANDB_DIR": str(trial_dir)}


def run_sweep(config, directory, count: int, overrides: list[str] = ()) -> list[dict]:
    """Run up to `count` trials of the sweep in `config` (a file) in `directory`; returns the trials run."""
    sweep = load_sweep(config)
    store = SweepDir(directory, sweep)
    owner = {"host": os.uname().nodename, "pid": os.getpid(),
             "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
             "slurm_task": os.environ.get("SLURM_ARRAY_TASK_ID")}
    done = []
    with progress_bar(count, f"sweep {Path(config).stem}", unit="trial") as bar:
        for _ in range(count):
            trial = run_trial(store, sweep, owner, overrides)
            if trial is None:
                print(f"sweep {directory}: no more trials to draw", flush=True)
                break
            done.append(trial)
            bar.update(1)
            if trial["signalled"]:  # the job is going away: draw nothing more
                break
            if [t["state"] for t in done] == ["failed"] * max_initial_failures():
                print(f"sweep {directory}: the first {len(done)} trials failed, stopping (as wandb agent does; "
                      f"their logs: {store.dir}/<trial>/logs/trial.log)", flush=True)
                break
    return done


def max_initial_failures() -> int:
    """wandb agent's rule: a runner whose first N trials all fail stops (a broken command, a missing checkpoint)
    instead of failing every trial of the sweep; N from WANDB_AGENT_MAX_INITIAL_FAILURES, default 5 (wandb's)."""
    return int(os.environ.get("WANDB_AGENT_MAX_INITIAL_FAILURES", 5))


def run_trial(store: SweepDir, sweep: dict, owner: dict, overrides) -> dict | None:
    """Claim the next trial (a preempted one first), run it, record it; None when the sweep is exhausted."""
    trial = store.claim(owner)
    if trial is None:
        return None
    trial_dir = store.dir / trial["name"]
    argv = build_command(sweep, trial["params"]) + list(overrides) + [f"hydra.run.dir={trial_dir}"]
    trial |= {"command": argv, "overrides": list(overrides), "job_overrides": job_overrides()}
    with store.lock():
        store.save(trial)  # what it runs with, recorded before it runs
    print(f"trial {trial['name']} ({'resumed' if trial.get('resumes') else 'new'}): {' '.join(argv)}", flush=True)

    def mark_preempting():
        trial["state"] = "preempting"
        with store.lock():
            store.save(trial)

    process = TrialProcess(argv, trial_env(trial_dir), trial_dir / "logs" / "trial.log", mark_preempting)
    trial["returncode"], trial["signalled"] = process.run(), process.preempted
    trial["state"] = ("finished" if trial["returncode"] == 0 else "preempted" if process.preempted
                      else "failed")
    store.record(trial)
    metric = (sweep.get("metric") or {}).get("name")
    print(f"trial {trial['name']} {trial['state']}"
          + (f": {metric}={trial['summary'].get(metric)}" if metric else ""), flush=True)
    return trial
