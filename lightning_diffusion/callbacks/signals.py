"""Stop on SIGTERM / SIGUSR1 at a step every rank agrees on: write last.ckpt, requeue under SLURM, exit.

Lightning's own SLURM handler saves and barriers *inside* the signal handler, so under DDP a rank that takes the
signal while its peer waits in the gradient all-reduce pairs a barrier with an all-reduce and the job hangs (the
requeue never runs). Here the handler only records the signal; the ranks agree on it at the end of a step.
"""

import os
import signal
import subprocess

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

STOP, REQUEUE = 1, 2  # what the ranks agree on (max over ranks): nothing, stop, or stop and requeue


class CheckpointOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1: after the step, every rank saves last.ckpt together; then, if it was SLURM's requeue
    signal (`--signal=USR1@...`, SLURMEnvironment(auto_requeue=True)), rank 0 runs `scontrol requeue`; then every
    rank exits with 128 + the signal. The requeued job resumes from last.ckpt (`ckpt_path=last`).

    The agreement is one all-reduce of two integers per step under DDP (Lightning already broadcasts its SIGTERM flag
    every step). With `auto_requeue=false` (hydra-submitit-launcher owns the requeue), a SIGUSR1 handler that is
    already installed (submitit's) is left alone.
    """

    def __init__(self):
        self.received: int | None = None
        self.requeue_signal: int | None = None

    def on_fit_start(self, trainer, pl_module):
        self.received = None

    def on_sanity_check_start(self, trainer, pl_module):
        self._install(trainer)

    def on_train_start(self, trainer, pl_module):
        self._install(trainer)

    def _install(self, trainer) -> None:
        """Replace Lightning's handlers, installed when fit began (it puts the previous ones back when fit ends)."""
        # the environment Lightning chose, as its signal connector reads it: set by trainer=slurm, or found by
        # itself in a SLURM job, also with a single-device strategy (a sweep trial under `wandb agent`)
        environment = trainer._accelerator_connector.cluster_environment
        requeues = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        self.requeue_signal = environment.requeue_signal if requeues else None
        signals = {signal.SIGTERM, self.requeue_signal or signal.SIGUSR1}
        usr1 = signal.getsignal(signal.SIGUSR1)
        if not requeues and usr1 not in (signal.SIG_DFL, signal.SIG_IGN, None, self._record):
            signals.discard(signal.SIGUSR1)  # someone else's (submitit's)
        for s in signals:
            signal.signal(s, self._record)

    def _record(self, signum, _frame):
        self.received = self.received or signum

    def _agreed(self, trainer) -> tuple[int, int]:
        """(0, STOP or REQUEUE; the signal) as every rank agrees after this step: the largest over the ranks."""
        kind = 0 if self.received is None else REQUEUE if self.received == self.requeue_signal else STOP
        if not (dist.is_available() and dist.is_initialized() and trainer.world_size > 1):
            return kind, self.received or 0
        agreed = torch.tensor([kind, self.received or 0], device=trainer.strategy.root_device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return tuple(agreed.tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside a gradient accumulation window (the same batch_idx on every rank)
        decision, signum = self._agreed(trainer)
        if not decision:
            return
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath is not None:
            path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            callback.last_model_path = path  # so that, resumed, ModelCheckpoint keeps writing last.ckpt (not -v1)
            trainer.save_checkpoint(path)
            rank_zero_info(f"stopped by a signal at step {trainer.global_step}: saved {path}")
        else:
            rank_zero_warn(f"stopped by a signal at step {trainer.global_step}: no checkpoint directory, nothing saved")
        if decision == REQUEUE:
            if trainer.is_global_zero:
                requeue_this_job()
            trainer.strategy.barrier("requeue")  # no rank exits (srun --kill-on-bad-exit) before the requeue is sent
        raise SIGTERMException(128 + signum)


def requeue_this_job() -> None:
    """`scontrol requeue` this SLURM job (or this element of a job array): it stops, waits and starts again."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")
    if job is None:
        rank_zero_warn("not requeued: SLURM_JOB_ID is not set (not a SLURM job)")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"`scontrol requeue {job}` could not run: {err}")
        return
    if result.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
