"""Stop on SIGTERM / SIGUSR1 wherever the run is: at a point every rank agrees on, write last.ckpt, requeue under
SLURM, exit with 128 + the signal.

Lightning's own SLURM handler saves and barriers *inside* the signal handler, so under DDP a rank that takes the
signal while its peer waits in the gradient all-reduce pairs a barrier with an all-reduce and the job hangs (the
requeue never runs). Here the handler only records the signal, and the ranks agree on it at stop points they all
reach together: after every training step, after every validation batch, between the rounds of a sharded in-training
evaluation. Work that only rank 0 does (sample grids, the final samples) polls its own signal at every network
evaluation and is abandoned, so the next stop point comes within one evaluation. If none comes within `grace_s`
seconds of the signal (a rank stuck outside the loops), the process prints where it is and exits, so SLURM's kill
never finds it silently mid-write; the last checkpoint on disk stays whole (writes are atomic).
"""

import faulthandler
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import early_signals
from ..compat import average_swapped_out, cluster_environment

STOP, REQUEUE = 1, 2  # what the ranks agree on (max over ranks): nothing, stop, or stop and requeue


class Preempted(Exception):
    """Raised inside rank-0-only work when this rank holds a stop signal: the work is abandoned for the stop point."""


class CheckpointOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1: at the next stop point every rank saves last.ckpt (the last completed training step)
    together; then, if it was SLURM's requeue signal (`--signal=USR1@...`, SLURMEnvironment(auto_requeue=True)),
    rank 0 runs `scontrol requeue`; then every rank exits with 128 + the signal. The requeued job resumes from
    last.ckpt (`ckpt_path=last`).

    The agreement is one all-reduce of two integers per stop point under DDP. With `auto_requeue=false`
    (hydra-submitit-launcher owns the requeue), a SIGUSR1 handler that is already installed (submitit's) is left
    alone. `grace_s`: the longest a signalled process waits for a stop point before it exits on its own.
    """

    def __init__(self, grace_s: float = 90.0):
        if not grace_s > 0:
            raise ValueError(f"grace_s must be > 0 seconds, got {grace_s}")
        self.grace_s = float(grace_s)
        self.received: int | None = None
        self.requeue_signal: int | None = None
        self._deadline: threading.Timer | None = None

    def on_fit_start(self, trainer, pl_module):
        self.received = None

    def on_sanity_check_start(self, trainer, pl_module):
        self._install(trainer)

    def on_train_start(self, trainer, pl_module):
        self._install(trainer)

    def on_fit_end(self, trainer, pl_module):
        if self._deadline is not None:
            self._deadline.cancel()

    def _install(self, trainer) -> None:
        """Replace Lightning's handlers, installed when fit began (it puts the previous ones back when fit ends)."""
        # the environment Lightning chose, as its signal connector reads it: set by trainer=slurm, or found by
        # itself in a SLURM job, also with a single-device strategy (a sweep trial under `wandb agent`)
        environment = cluster_environment(trainer)
        requeues = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        self.requeue_signal = environment.requeue_signal if requeues else None
        signals = {signal.SIGTERM, self.requeue_signal or signal.SIGUSR1}
        usr1 = signal.getsignal(signal.SIGUSR1)
        if not requeues and usr1 not in (signal.SIG_DFL, signal.SIG_IGN, None, self._record, early_signals.record):
            signals.discard(signal.SIGUSR1)  # someone else's (submitit's)
        for s in signals:
            signal.signal(s, self._record)
        early = early_signals.take()  # a signal that came while the process started
        if early is not None and early in signals:
            self._record(early, None)

    @contextmanager
    def watching(self, trainer):
        """Signals recorded during work after fit (the final samples): when fit ended, Lightning put back the handlers
        of before it (the entry point's early recorder, or the default), which nothing polls. The ones found are
        restored afterwards."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, self.requeue_signal or signal.SIGUSR1)}
        self._install(trainer)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _record(self, signum, _frame):
        if self.received is None:
            self.received = signum
            self._deadline = threading.Timer(self.grace_s, self._give_up, (signum,))
            self._deadline.daemon = True
            self._deadline.start()

    def _give_up(self, signum: int) -> None:
        """No stop point within grace_s of the signal: say where the process is, and exit (the timer's thread)."""
        print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] received {signal.Signals(signum).name} "
              f"{self.grace_s:.0f} s ago and reached no stop point since (stuck where the traceback below shows); "
              "exiting without a new checkpoint: the last one written stays whole", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr)
        os._exit(128 + signum)

    @property
    def pending(self) -> bool:
        """Whether this process holds a signal not acted on yet (for rank-0-only work, without a collective)."""
        return self.received is not None

    def _agreed(self, trainer) -> tuple[int, int]:
        """(0, STOP or REQUEUE; the signal) as every rank agrees at this point: the largest over the ranks."""
        kind = 0 if self.received is None else REQUEUE if self.received == self.requeue_signal else STOP
        if not (dist.is_available() and dist.is_initialized() and trainer.world_size > 1):
            return kind, self.received or 0
        agreed = torch.tensor([kind, self.received or 0], device=trainer.strategy.root_device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return tuple(agreed.tolist())

    def stop_point(self, trainer, pl_module) -> None:
        """A point every rank reaches together: if any rank holds a signal, all save last.ckpt and exit."""
        decision, signum = self._agreed(trainer)
        if not decision:
            return
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath is not None:
            path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            callback.last_model_path = path  # so that, resumed, ModelCheckpoint keeps writing last.ckpt (not -v1)
            with average_swapped_out(trainer, pl_module):  # mid-validation the EMA is swapped into the module
                trainer.save_checkpoint(path)
            rank_zero_info(f"stopped by a signal at step {trainer.global_step}: saved {path}")
        else:
            rank_zero_warn(f"stopped by a signal at step {trainer.global_step}: no checkpoint directory, nothing saved")
        self._exit(trainer, decision, signum)

    def stop_after_fit(self, trainer) -> None:
        """A signal during the final samples (rank 0 alone): last.ckpt already holds the last step; requeue, exit."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self.received == self.requeue_signal:
            requeue_this_job()
        raise SIGTERMException(128 + self.received)

    def _exit(self, trainer, decision: int, signum: int) -> None:
        if decision == REQUEUE:
            if trainer.is_global_zero:
                requeue_this_job()
            trainer.strategy.barrier("requeue")  # no rank exits (srun --kill-on-bad-exit) before the requeue is sent
        if self._deadline is not None:
            self._deadline.cancel()
        raise SIGTERMException(128 + signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.is_last_batch:
            return  # inside an accumulation window, or the epoch's last batch: its stop point is the epoch's end
        self.stop_point(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        # after the epoch's last step (a save inside that batch resumes into a miscounted epoch: ModelCheckpoint)
        self.stop_point(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.stop_point(trainer, pl_module)


def signal_callback(trainer) -> CheckpointOnSignal | None:
    """The trainer's CheckpointOnSignal, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, CheckpointOnSignal)), None)


def stop_point(trainer, pl_module) -> None:
    """A stop point every rank reaches together (between rounds of a sharded evaluation); nothing without the callback."""
    callback = signal_callback(trainer)
    if callback is not None:
        callback.stop_point(trainer, pl_module)


def signals_watched(trainer):
    """A context in which rank-0 work after fit receives stop signals (`CheckpointOnSignal.watching`)."""
    callback = signal_callback(trainer)
    return nullcontext() if callback is None else callback.watching(trainer)


def abandon_if_signalled(trainer) -> None:
    """Inside rank-0-only work: raise Preempted if this rank holds a stop signal (polled at each network evaluation)."""
    callback = signal_callback(trainer)
    if callback is not None and callback.pending:
        raise Preempted


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


class MarkPreempting(L.Callback):
    """In a `wandb agent` trial stopped by a signal (CheckpointOnSignal has then saved last.ckpt), mark the W&B run
    preempting, so W&B hands its configuration to another agent. Does nothing outside a sweep."""

    def on_exception(self, trainer, pl_module, exception):
        if not (isinstance(exception, SIGTERMException) and os.environ.get("WANDB_SWEEP_ID") and trainer.is_global_zero):
            return
        import wandb

        if wandb.run is not None:
            wandb.run.mark_preempting()
