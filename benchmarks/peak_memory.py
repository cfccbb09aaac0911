"""Peak memory of the main job (`python -m lightning_diffusion.train`), as the peak resident set of the process.

    python benchmarks/peak_memory.py [--quick]

Three runs, each a fresh process (ru_maxrss of that child alone, from os.wait4):
  imports       python -c "import lightning_diffusion.train": the fixed cost of the interpreter and libraries.
  training      the main job without its sampling callbacks (sample grid, final samples).
  main job      the main job as it is (class-conditional DDPM, unet_tiny, 8x8 digits, EMA, checkpoints, grids,
                the final 500 guided + 1000 unconditional samples and their classifier metric), with fewer
                optimizer steps and sampler steps than the default, which set time, not memory: every sample
                batch keeps the main job's size, and no sampler keeps a per-step history.
CPU numbers; on a GPU machine the same job's torch.cuda.max_memory_allocated is the number to add.
"""

import os
import subprocess
import sys
import tempfile
import time

from _common import arguments, header, table


def peak_of(command: list[str]) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of one child process, from wait4's rusage of that child alone."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            log.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{log.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main():
    args = arguments(__doc__.splitlines()[0])
    header("Peak memory of the main job", args.quick)
    steps, sampler_steps = (4, 1) if args.quick else (30, 2)
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, "-m", "lightning_diffusion.train", "logger=csv", "trainer.enable_progress_bar=false",
                  f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps // 2}",
                  "trainer.limit_val_batches=1",
                  f"grid.steps={sampler_steps}", "ckpt_path=null"]
        quick = ["callbacks.final_samples.n_per_class=2", "callbacks.final_samples.n_unconditional=8",
                 "callbacks.sample_grid.n=8"] if args.quick else []
        runs = [
            ("imports (python + torch + lightning + lightning_diffusion)",
             [sys.executable, "-c", "import lightning_diffusion.train"]),
            ("training only (no sample grid, no final samples)",
             common + [f"hydra.run.dir={tmp}/train", "~callbacks.sample_grid", "~callbacks.final_samples"]),
            ("main job (final samples: 50 per class guided + 1000 unconditional)" if not args.quick
             else "main job (quick: tiny sample counts)", common + quick + [f"hydra.run.dir={tmp}/main"]),
        ]
        rows = []
        for name, command in runs:
            peak, wall = peak_of(command)
            rows.append([name, peak, wall])
    table(f"peak resident memory (MiB; {steps} optimizer steps, {sampler_steps}-step ancestral sampler)",
          ["run", "peak RSS MiB", "wall s"], rows)
    if rows[2][1] <= rows[1][1]:
        print("note: the main job's peak is the training peak (the sampling callbacks did not raise it)")


if __name__ == "__main__":
    main()
