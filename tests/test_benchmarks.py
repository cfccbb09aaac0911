"""Every benchmark's --quick mode runs and prints its tables (for rot: the numbers are not checked)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
    assert len(tables(out)) == 2
    assert "diffusers DPMSolverMultistep" in out and "ours <= peer?" in out


@pytest.mark.slow
def test_training_overhead_quick():
    out = run_quick("training_overhead.py")
    assert len(tables(out)) == 2 and "hand loop images/s" in out


@pytest.mark.slow
def test_training_overhead_profile_quick():
    out = run_quick("training_overhead.py", "--profile")
    assert len(tables(out)) == 2 and "per-bin logging" in out and "callback EMA" in out


@pytest.mark.slow
def test_sampling_overhead_quick():
    out = run_quick("sampling_overhead.py")
    assert len(tables(out)) == (2 if Path("/proc/self/clear_refs").exists() else 1)
    assert "bare network calls ms" in out


@pytest.mark.slow
def test_peak_memory_quick():
    out = run_quick("peak_memory.py")
    assert len(tables(out)) == 1 and "main job" in out


@pytest.mark.slow
def test_compile_bf16_quick():
    out = run_quick("compile_bf16.py")
    assert len(tables(out)) == 1 and "bf16-mixed" in out


@pytest.mark.slow
def test_latent_cost_quick():
    out = run_quick("latent_cost.py")
    assert len(tables(out)) == 1 and out.count("latents, cached") == 2
