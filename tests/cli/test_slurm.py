"""The sbatch scripts on a real one-node SLURM (slurmctld + slurmd + munge, started and stopped by the test).

Checks that the single-node training job runs two srun ranks (CPU DDP), that USR1 (as `--signal=USR1@...` would
send it) makes both ranks checkpoint at one step and requeue the job (CheckpointOnSignal), and that the requeued
job resumes in the same run directory; and that an offline sweep job array runs every element.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from slurm_cluster import SlurmCluster, unavailable_reason

from helpers import ROOT

SLURM = ROOT / "slurm"
CPU = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=10:00")  # the scripts ask for GPUs; this node has none

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def running_cluster(tmp_path_factory):
    reason = unavailable_reason()
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


def test_training_job_runs_two_ranks_and_requeues_on_usr1(cluster, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["data=moons", "network=mlp", "logger=csv", "trainer.accelerator=cpu", "trainer.precision=32-true",
                 "trainer.max_steps=1500", "trainer.val_check_interval=500", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50", "callbacks.sample_grid=null",
                 "callbacks.final_samples.n_unconditional=64", "callbacks.checkpoint.every_n_train_steps=50",
                 "grid.steps=10"]
    job = cluster.sbatch(SLURM / "train_single_node.sbatch", *overrides, cwd=ROOT,
                         options=(*CPU, "--ntasks-per-node=2", f"--export=ALL,RUN_DIR={run_dir}",
                                  f"--output={tmp_path}/slurm-%j.out"))
    log = run_dir / "logs" / f"train-{job}.log"
    read_log = lambda: log.read_text() if log.exists() else ""  # noqa: E731

    # 1. it trains with two ranks: wait for its first checkpoint
    cluster.wait(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240, "a first checkpoint")
    assert re.search(r"GLOBAL_RANK: 0, MEMBER: 1/2", read_log()) and re.search(r"GLOBAL_RANK: 1, MEMBER: 2/2",
                                                                                  read_log()), read_log()[-3000:]

    # 2. USR1 to the job's steps (what --signal=USR1@120 sends before the time limit): both ranks stop after one
    # step, save last.ckpt together, and rank 0 requeues the job
    cluster.run(["scancel", "--signal=USR1", str(job)])
    cluster.wait(lambda: cluster.job(job).get("Restarts") == "1", 90, "the job to be requeued")
    stopped = re.findall(r"stopped by a signal at step (\d+)", read_log())
    assert stopped and f"requeued SLURM job {job}" in read_log(), read_log()[-3000:]
    stopped_at = int(stopped[0])
    assert 0 < stopped_at < 1500
    cluster.wait(lambda: cluster.job(job).get("JobState") == "PENDING", 60, "the requeued job to wait")
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == stopped_at
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # skip the ~120 s BeginTime hold

    # 3. the rerun resumes from that checkpoint in the same run directory and finishes
    record = cluster.wait_done(job, 300)[0]
    text = read_log()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-4000:])
    assert "restart 1 on" in text, text[-2000:]
    rerun = text[text.index("restart 1 on"):]
    restored = re.findall(r"Restoring states from the checkpoint path at (\S+)", rerun)
    assert restored and Path(restored[0]) == run_dir / "checkpoints" / "last.ckpt", rerun[-3000:]
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 1500
    assert (run_dir / "metrics.json").is_file()
    print(f"USR1: both ranks stopped at step {stopped_at}; the requeued job resumed from there and finished")


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
