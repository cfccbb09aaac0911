"""What every benchmark shares: the command line, the machine line, interleaved median timing, tables, configs.

Timings on a shared CPU are noisy, so every script measures the variants it compares in one run, interleaved
round by round, and reports medians and their ratios (never absolute numbers from another run).
"""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[1] / "conf"


def arguments(description: str, **extra) -> argparse.Namespace:
    """--quick (a few seconds, for CI: checks the script runs, not its numbers), --threads, plus `extra` flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (for rot, not for numbers)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared CPU more threads only add contention)")
    for flag, help_text in extra.items():
        parser.add_argument(f"--{flag}", action="store_true", help=help_text)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    return args


def quiet() -> None:
    """Keep Lightning's banners and warnings out of the tables."""
    import logging
    import warnings
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, {gpu}, Python {platform.python_version()}")


def header(title: str, quick: bool) -> None:
    print(f"# {title}{' (--quick: numbers are meaningless)' if quick else ''}")
    print(f"machine: {machine()}\n")


def table(title: str, columns: list[str], rows: list[list]) -> None:
    """A Markdown table, floats with 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    print(f"## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    print()


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, in a rotating order; each call returns its own measurement (seconds)."""
    names, results = list(variants), {name: [] for name in variants}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(variants[name]())
    return results


def median(values) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compose(overrides: list[str], run_dir: str):
    """The config `python -m lightning_diffusion.train <overrides>` would see, with the run directory given."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightning_diffusion.lightning.tracking import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = run_dir
        del cfg.hydra
    return cfg
