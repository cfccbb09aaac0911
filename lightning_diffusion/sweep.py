"""Offline W&B sweeps: `python -m lightning_diffusion.sweep --config sweeps/x.yaml [--count N] [--dir DIR] [-- override ...]`.

W&B's own sweep engine draws each trial, which runs offline in <dir>/<trial>/ (`lightning.sweep_runner`; the default
dir is runs/sweeps/<file name>); arguments after `--` are Hydra overrides appended to every trial.
"""

import argparse
import sys
from pathlib import Path

from .lightning.sweep_runner import run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Arguments after `--` are Hydra overrides appended to every trial.")
    parser.add_argument("--config", required=True, help="a W&B sweep file (sweeps/*.yaml)")
    parser.add_argument("--count", type=int, default=1, help="trials to run in this process (wandb agent --count)")
    parser.add_argument("--dir", default=None, help="the sweep's directory, shared by every runner of the sweep "
                                                    "(default: runs/sweeps/<config file name>)")
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    trials = run_sweep(args.config, args.dir or Path("runs") / "sweeps" / Path(args.config).stem, args.count, overrides)
    return 1 if any(t["state"] == "failed" for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
