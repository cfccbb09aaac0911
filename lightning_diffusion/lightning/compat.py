"""Every private Lightning API the package uses, in one place, each with why no public API serves.

`lightning` is pinned below the next minor version the tests have not seen (pyproject.toml); tests/lightning/
test_compat.py runs each accessor against the installed Lightning, so a move shows there, not deep in a run.
"""

import contextlib

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch import nn


def cluster_environment(trainer: L.Trainer):
    """The cluster environment Lightning chose, where its own signal connector reads it.

    `trainer.strategy.cluster_environment` is public only on parallel strategies; a single-device sweep trial inside
    a SLURM job also gets a SLURMEnvironment, and only the accelerator connector holds it then.
    """
    return trainer._accelerator_connector.cluster_environment


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer a module is attached to, or None (a module used alone: tests, sampling, export).

    `LightningModule.trainer` raises when none is attached (and under Fabric returns a shim without `world_size`);
    there is no public "is it attached", and the model asks it in hooks that also run outside a fit.
    """
    return module._trainer


def averaged_module(callback: WeightAveraging) -> nn.Module | None:
    """The module holding a WeightAveraging callback's average (None before fitting starts).

    WeightAveraging keeps it in a private torch AveragedModel and offers no accessor; in-training evaluations sample
    the EMA model without swapping it into the LightningModule mid-step.
    """
    average = callback._average_model
    return None if average is None else average.module


@contextlib.contextmanager
def average_swapped_out(trainer: L.Trainer, pl_module: L.LightningModule):
    """Inside a validation loop, the module's own weights back in place while the block runs (a save mid-validation).

    WeightAveraging swaps its average into the module for validation (`_swap_models`, both at the epoch's start and
    end) and offers no public way to undo that in between; a checkpoint written mid-validation would otherwise store
    the EMA as the training weights.
    """
    in_validation = trainer.validating or trainer.sanity_checking
    swapped = [c for c in trainer.callbacks if isinstance(c, WeightAveraging) and c._average_model is not None
               and in_validation]
    for callback in swapped:
        callback._swap_models(pl_module)
    try:
        yield
    finally:
        for callback in swapped:
            callback._swap_models(pl_module)


def callback_state_key(callback: L.Callback, **kwargs) -> str:
    """A callback's checkpoint key made from its arguments, as Lightning's own callbacks make theirs.

    `Callback._generate_state_key` is the helper Lightning's docs point to for `state_key`; it has no public alias.
    """
    return callback._generate_state_key(**kwargs)


def save_last_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Write last.ckpt now, unless this step's was already written.

    ModelCheckpoint (2.6) decides alone when last.ckpt is written and exposes no "save last now"; its private
    `_save_last_checkpoint` with its `_monitor_candidates` is what its own hooks call.
    """
    if callback._last_global_step_saved != trainer.global_step:
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
