"""The sbatch scripts on a real one-node SLURM (slurmctld + slurmd + munge, started and stopped by the test).

A training job whose time runs out (`--signal=USR1@N`) requeues and completes across allocations; a signal to the
batch shell (`scancel --signal=USR1 --batch`) reaches both ranks, which checkpoint at one step and requeue, and the
rerun resumes; a Hydra
multirun through hydra-submitit-launcher (conf/hydra/launcher/slurm.yaml) requeues through CheckpointOnSignal the
same way; sweep trials train on their allocation (trainer=slurm, the job's tasks) with every override; an offline
sweep job array runs every element.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from conftest import in_ci
from slurm_cluster import SlurmCluster, unavailable_reason

from helpers import ROOT, TESTS

SLURM = ROOT / "slurm"
CPU = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=10:00")  # the scripts ask for GPUs; this node has none

# one xdist worker runs these and the DDP tests (tests/lightning/test_ddp.py), one after another: the node has two CPUs
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.xdist_group("two_processes")]


@pytest.fixture(scope="module")
def running_cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason and in_ci():  # CI's machine can run a one-node SLURM as root: there, a missing cluster is a failure
        pytest.fail(f"no real SLURM on a CI machine: {reason}")
    if reason:
        pytest.skip(f"no real SLURM here: {reason}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def cluster(running_cluster):
    """The module's cluster, emptied after each test: a test that fails leaves no job to hold the next one's CPUs."""
    yield running_cluster
    jobs = running_cluster.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
    if jobs:
        running_cluster.run(["scancel", *jobs], check=False)
        running_cluster.wait(lambda: not running_cluster.run(["squeue", "-h"], check=False).stdout.strip(), 60,
                             "the queue to empty")


def global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def test_sbatch_scripts_are_valid_bash_with_signal_and_srun():
    for script in SLURM.glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "#SBATCH --ntasks-per-node=" in text and '"$@"' in text or "sweep_agent" in script.name, script
    for name in ("train_single_node", "train_multi_node"):
        text = (SLURM / f"{name}.sbatch").read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text and "srun " in text
    for name in ("sweep_agent_array", "sweep_offline_array"):
        assert "#SBATCH --signal=B:USR1@" in (SLURM / f"{name}.sbatch").read_text()
    assert "exec wandb agent --forward-signals" in (SLURM / "sweep_agent_array.sbatch").read_text()


TRAIN = ["data=moons", "network=mlp", "logger=csv", "trainer.accelerator=cpu", "trainer.precision=32-true",
         "trainer.val_check_interval=200", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=50", "callbacks.sample_grid=null", "callbacks.final_samples.n_unconditional=64",
         "callbacks.checkpoint.every_n_train_steps=50", "grid.steps=10"]


def release_requeues(cluster, job, until_done: float) -> dict:
    """Wait for the job to end, releasing each requeue from its BeginTime hold (~120 s) at once; its last record."""
    deadline = time.monotonic() + until_done
    while time.monotonic() < deadline:
        record = cluster.job(job)
        if record.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return record
        if record.get("JobState") == "PENDING" and record.get("Reason") == "BeginTime":
            cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        time.sleep(1)
    raise TimeoutError(f"job {job} not done within {until_done}s: {cluster.job(job)}")


def test_a_job_whose_time_runs_out_requeues_and_completes_across_allocations(cluster, tmp_path):
    """--time=3 minutes, --signal=USR1@60 and ~130 s of training (every step slowed to 0.1 s, so on any machine):
    SLURM sends the signal 60-90 s before the limit (its timer runs every 30 s), after start-up (~30 s); both ranks
    save last.ckpt at one step, the job requeues, and the next allocation finishes the run."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(SLURM / "train_single_node.sbatch", *TRAIN, "trainer.max_steps=1300",
                         "+callbacks.slow._target_=helpers.SlowSteps", cwd=ROOT,
                         options=("--gpus-per-node=0", "--cpus-per-task=1", "--time=3", "--signal=USR1@60",
                                  "--ntasks-per-node=2", f"--export=ALL,RUN_DIR={run_dir},PYTHONPATH={TESTS}",
                                  f"--output={tmp_path}/slurm-%j.out"))
    record = release_requeues(cluster, job, 540)
    text = (run_dir / "logs" / f"train-{job}.log").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-4000:])
    restarts = int(record["Restarts"])
    stops = [int(s) for s in re.findall(r"stopped by a signal at step (\d+)", text)]
    assert restarts >= 1 and len(stops) == restarts and stops == sorted(stops), (restarts, stops, text[-3000:])
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 1300 and (run_dir / "metrics.json").is_file()
    assert not (tmp_path / f"slurm-{job}.out").exists()
    print(f"{restarts + 1} allocations; the time-limit signal stopped them at steps {stops}")


def test_a_signal_to_the_batch_shell_requeues_and_resumes(cluster, tmp_path):
    """`scancel --signal=USR1 --batch` reaches only the batch shell: the script passes it on to both ranks (the
    multi-node script, 1 node x 2 tasks), which save at one step and requeue; the rerun resumes and completes."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(SLURM / "train_multi_node.sbatch", *TRAIN, "trainer.max_steps=400",
                         "+callbacks.slow._target_=helpers.SlowSteps", cwd=ROOT,
                         options=(*CPU, "--nodes=1", "--ntasks-per-node=2", f"--output={tmp_path}/slurm-%j.out",
                                  f"--export=ALL,RUN_DIR={run_dir},PYTHONPATH={TESTS}"))
    log = run_dir / "logs" / f"train-{job}.log"
    read_log = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    cluster.wait(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240, "a first checkpoint")
    assert re.search(r"GLOBAL_RANK: 1, MEMBER: 2/2", read_log()), read_log()[-3000:]
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    cluster.wait(lambda: cluster.job(job).get("Restarts") == "1", 90, "the job to be requeued")
    stopped = [int(s) for s in re.findall(r"stopped by a signal at step (\d+)", read_log())]
    assert stopped and f"requeued SLURM job {job}" in read_log(), read_log()[-3000:]
    record = release_requeues(cluster, job, 300)
    text = read_log()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-4000:])
    rerun = text[text.index("restart 1 on"):]
    restored = re.findall(r"Restoring states from the checkpoint path at (\S+)", rerun)
    assert restored and Path(restored[0]) == run_dir / "checkpoints" / "last.ckpt", rerun[-3000:]
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 400
    assert not (tmp_path / f"slurm-{job}.out").exists()  # SLURM's own output file, empty, is not left behind
    print(f"USR1 to the batch shell: both ranks stopped at step {stopped[0]}; the requeued job finished")


def test_the_slurm_launcher_leaves_the_requeue_to_checkpoint_on_signal():
    """hydra/launcher=slurm: SLURM's signal is USR1 to every task (what SLURMEnvironment requeues on), the job is
    requeueable, and submitit neither resubmits by itself nor gets its own signal (USR2)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "trainer=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher") and launcher.max_num_timeout == 0
    assert launcher.additional_parameters.signal == "USR1@120" and launcher.additional_parameters.requeue is True
    assert launcher.gpus_per_node == launcher.tasks_per_node == 1


def test_a_hydra_multirun_on_slurm_requeues_and_resumes(cluster, tmp_path):
    """`-m hydra/launcher=slurm`: the multirun's job trains on two SLURM tasks; USR1 (what SLURM sends before the
    time limit) stops both ranks at one step, rank 0 requeues; the requeued element reruns the same Hydra job in the
    same run directory, resumes, and the multirun returns when it is done."""
    sweep_dir = tmp_path / "multirun"
    command = [sys.executable, "-m", "lightning_diffusion.train", "-m", "hydra/launcher=slurm", "trainer=slurm",
               *TRAIN, "trainer.max_steps=400", "+callbacks.slow._target_=helpers.SlowSteps", "seed=3",
               f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=0",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    multirun = subprocess.Popen(command, cwd=tmp_path, env=cluster.env | {"PYTHONPATH": str(TESTS)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweep_dir / "0"
    try:
        cluster.wait(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240, "a first checkpoint")
        (job,) = cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
        cluster.run(["scancel", "--signal=USR1", job])
        cluster.wait(lambda: cluster.job(job).get("Restarts") == "1", 90, "the job to be requeued")
        record = release_requeues(cluster, job, 300)
        output, _ = multirun.communicate(timeout=120)
    finally:
        multirun.kill()
    logs = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_0_log.*")))
    assert multirun.returncode == 0 and record["JobState"] == "COMPLETED", (record, output[-3000:], logs[-3000:])
    stopped = re.findall(r"stopped by a signal at step (\d+)", logs)
    assert stopped and f"requeued SLURM job {job}" in logs, logs[-3000:]
    assert re.search(r"Restoring states from the checkpoint path at \S+last.ckpt", logs), logs[-3000:]
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 400 and (run_dir / "metrics.json").is_file()
    print(f"multirun through submitit: stopped at step {stopped[0]}, requeued, resumed, finished")


def test_sweep_trials_train_on_their_allocation(cluster, tmp_path):
    """The agent array's trials get trainer=slurm and the script's overrides (a stand-in `wandb agent` runs the
    sweep command as W&B's would): the trial's resolved config follows the allocation (devices from the job's tasks)
    and its command records every override; the offline array's trials likewise, recorded in trial.json."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    agent = bin_dir / "wandb"  # `wandb agent --forward-signals --count N ID`: one trial of the train command
    agent.write_text("#!/bin/bash\nexec python -m lightning_diffusion.train " + " ".join(TRAIN) + " trainer.max_steps=2"
                     f" hydra.run.dir={tmp_path}/agent_trial model.optimizer.lr=0.002\n")
    agent.chmod(0o755)
    job = cluster.sbatch(SLURM / "sweep_agent_array.sbatch", "callbacks.final_samples=null", cwd=tmp_path,
                         options=(*CPU, "--array=0", f"--output={tmp_path}/slurm-%A_%a.out",
                                  f"--export=ALL,SWEEP_ID=me/p/abc,PATH={bin_dir}:{os.environ['PATH']}"))
    records = cluster.wait_done(job, 240)
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "sweeps" / "abc" / "logs").glob("agent-*.log"))
    assert all(r["JobState"] == "COMPLETED" for r in records), (records, logs[-3000:])
    assert "overrides for every trial: trainer=slurm" in logs and not list(tmp_path.glob("slurm-*.out"))
    resolved = yaml.safe_load((tmp_path / "agent_trial" / "config.yaml").read_text())
    assert resolved["trainer"]["devices"] == 1 and resolved["trainer"]["num_nodes"] == 1  # SLURM_NTASKS_PER_NODE
    assert resolved["trainer"]["plugins"][0]["_target_"].endswith("SLURMEnvironment")
    assert resolved["callbacks"]["final_samples"] is None and resolved["model"]["optimizer"]["lr"] == 0.002


def test_offline_sweep_array_runs_every_element(cluster, tmp_path):
    script = ("import json, os, pathlib, sys; d = pathlib.Path(sys.argv[-1].split('=', 1)[1]); "
              "d.mkdir(parents=True, exist_ok=True); a = int(sys.argv[1].split('=')[1]); "
              "(d / 'metrics.json').write_text(json.dumps({'val/loss': a, 'task': os.environ['SLURM_ARRAY_TASK_ID']}))")
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
                                     "parameters": {"a": {"values": [1, 2, 3]}},
                                     "command": ["${env}", "${interpreter}", "-c", script, "${args_no_hyphens}"]}))
    sweep_dir = tmp_path / "sweep"
    job = cluster.sbatch(SLURM / "sweep_offline_array.sbatch", cwd=ROOT,
                         options=(*CPU, "--array=0-2", f"--output={tmp_path}/slurm-%A_%a.out",
                                  f"--export=ALL,SWEEP={sweep},SWEEP_DIR={sweep_dir},COUNT=1"))
    records = cluster.wait_done(job, 180)
    assert len(records) == 3 and all(r["JobState"] == "COMPLETED" for r in records), records
    trials = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/trial.json"))]
    assert sorted(t["params"]["a"] for t in trials) == [1, 2, 3] and {t["state"] for t in trials} == {"finished"}
    assert sorted(t["summary"]["task"] for t in trials) == ["0", "1", "2"]  # one trial per array element
    assert len(list((sweep_dir / "logs").glob(f"runner-{job}_*.log"))) == 3
