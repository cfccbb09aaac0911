"""Composing the project's Hydra configs in tests, as the command line would."""

import io
import json
import math
import os
import zipfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from PIL import Image
from omegaconf import DictConfig, open_dict
from torch import nn

from lightning_diffusion.lightning.data import to_uint8
from lightning_diffusion.lightning.tracking import register_resolvers

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONF = ROOT / "conf"
# the diffusion families: conf/model/ also has the autoencoder (latent diffusion's first stage) and _base (shared)
FAMILIES = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem not in ("_base", "autoencoder"))

register_resolvers()


def compose_config(overrides: list[str], run_dir: Path | None = None, config_name: str = "train") -> DictConfig:
    """The config `python -m lightning_diffusion.<config_name> <overrides>` would see, with `${hydra:...}` resolvable."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        del cfg.hydra
    return cfg


FAST = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.sample_grid.n=4",
        "callbacks.final_samples.n_per_class=1", "callbacks.final_samples.n_unconditional=8",
        "callbacks.checkpoint.every_n_train_steps=2"]
# a tiny training run: a checkpoint in seconds, nothing drawn at its end
TINY = FAST + ["network.channels=16", "callbacks.final_samples=null", "callbacks.sample_grid=null", "grid.steps=5"]


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| over the floating-point entries of two state dicts, in float64."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()))


class FixedOutput(nn.Module):
    """A 'network' returning a given tensor, so a Denoiser can be fed any prediction (D and v set exactly)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, c_noise, labels=None):
        return self.out



class SaveRankState(L.Callback):
    """For subprocess runs (PYTHONPATH=tests): each rank saves its weights and per-device batch when fitting ends.

    Runs after EMA's on_fit_end (later in the callbacks list), which has copied the EMA weights into the model.
    """

    def on_fit_end(self, trainer, pl_module):
        torch.save({"weights": pl_module.state_dict(), "batch_size": trainer.datamodule.batch_size},
                    Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


class PoisonRankOne(L.Callback):
    """For subprocess DDP runs (PYTHONPATH=tests): rank 1's network returns NaN in training step 3 only."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != 1:
            return
        network = pl_module.denoiser.network
        forward = network.forward

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            return out * float("nan") if torch.is_grad_enabled() and trainer.global_step == 3 else out

        network.forward = poisoned


def entry_point_env(**extra: str) -> dict:
    """The environment of a subprocess run of an entry point: no SLURM_* variables (inside a SLURM job Lightning would
    take the run for one of its tasks, and a signal would requeue the job), warnings quiet, plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"PYTHONWARNINGS": "ignore"} | extra


class SignalAt(L.Callback):
    """For subprocess runs (PYTHONPATH=tests): this process sends itself `signum` after training step `step`, or in
    the first validation batch after it (`where='val'`, not the sanity check)."""

    def __init__(self, step: int, signum: int = 15, where: str = "train"):
        self.step, self.signum, self.where = step, signum, where

    def on_train_batch_end(self, trainer, *args):
        if self.where == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "val" and not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


class SlowValidation(L.Callback):
    """For subprocess runs: every validation batch after the sanity check takes `seconds` longer; the first one writes
    <run_dir>/validating, so a test knows when to send its signal."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            Path(trainer.default_root_dir, "validating").touch()
            time.sleep(self.seconds)


class SlowSteps(L.Callback):
    """For subprocess runs: every training step takes `seconds` longer, so a run lasts as long on any machine."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, *args):
        time.sleep(self.seconds)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def write_edm_zip(path, images: torch.Tensor, labels: list[int] | None, json_labels="auto", truncate: int | None = None):
    """images (N, 1, H, W) in [-1, 1] as EDM's layout; `json_labels` overrides dataset.json's labels entry."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for i, (name, image) in enumerate(zip(names, to_uint8(images))):
            data = png(image[0].numpy())
            z.writestr(name, data[: len(data) // 2] if i == truncate else data)
        if json_labels is not None:
            entries = [[n, y] for n, y in zip(names, labels)] if labels is not None else None
            z.writestr("dataset.json", json.dumps({"labels": entries if json_labels == "auto" else json_labels}))
    return path, names
