"""Every benchmark's --quick mode runs and prints its tables (for rot: the numbers are not checked)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


def run_quick(script: str, *flags: str) -> str:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *flags], capture_output=True, text=True,
                         timeout=600, cwd=BENCHMARKS.parent, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def tables(stdout: str) -> list[str]:
    """The titles of the Markdown tables printed, each with a header separator and at least one row."""
    lines = stdout.splitlines()
    titles = [line for line in lines if line.startswith("## ")]
    assert titles, stdout
    for title in titles:
        rest = lines[lines.index(title) + 1:]
        body = [line for line in rest if line.strip()][:3]
        assert body[0].startswith("| ") and body[1].startswith("|---") and body[2].startswith("| "), stdout
    return titles


def test_quality_per_nfe_quick():
    out = run_quick("quality_per_nfe.py")
    titles = tables(out)  # the 2-D mixture and the digits (64-D only in the full run), each a table and its goal rows
    assert len(titles) == 4 and sum("goal (ours <= peer?)" in t for t in titles) == 2, titles
    assert "diffusers DPMSolverMultistep" in out and "k-diffusion" in out and "unipc (optimized)" in out


# script + flags -> (tables printed, strings its output must hold); the slow ones train or time real fits
SLOW_QUICK_MODES = {
    "training_overhead.py": (2, ["hand loop images/s"]),
    "training_overhead.py --profile": (2, ["per-bin logging", "callback EMA"]),
    "sampling_overhead.py": (2 if Path("/proc/self/clear_refs").exists() else 1, ["bare network calls ms"]),
    "peak_memory.py": (1, ["main job"]),
    "compile_bf16.py": (1, ["bf16-mixed"]),
    "latent_cost.py": (1, ["digits16 | latents, cached", "digits | latents, cached"]),
    # the DDPM U-Net at a CPU width (the recipe's DDPM++ is the GPU run's), no augmentation labels for it
    "gpu_throughput.py network=unet_ddpm_cifar10 ~network.augment_dim model.augment=null network.channels=16 "
    "network.channel_mult=[1,2] network.num_res_blocks=1 network.attn_resolutions=[16] data.num_workers=2":
        (3, ["hand loop images/s", "data loader alone", "--quick: compilation takes minutes"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", SLOW_QUICK_MODES, ids=[c if len(c) < 40 else c.split()[0]  # short ids
                                                           for c in SLOW_QUICK_MODES])
def test_quick_mode_prints_its_tables(command):
    out = run_quick(*command.split())
    n_tables, expected = SLOW_QUICK_MODES[command]
    assert len(tables(out)) == n_tables
    for text in expected:
        assert text in out, text


@pytest.mark.slow
def test_gpu_throughput_benchmark_on_cuda():
    """The GPU run: experiment=edm_cifar10's DDPM++ at batch 512, bf16-mixed, eager and compiled, ours and the hand
    loop, the loader; within its own 270 s budget (under 5 minutes of device time with start-up)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_throughput.py"), "--budget", "270"],
                         capture_output=True, text=True, timeout=420, cwd=BENCHMARKS.parent,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert len(tables(out.stdout)) == 2 and "| compiled |" in out.stdout and "## not run" not in out.stdout
