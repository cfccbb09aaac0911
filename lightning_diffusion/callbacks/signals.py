"""Checkpoint before exit on SIGTERM (and SIGUSR1 outside SLURM), so a stopped job loses at most one step."""

import signal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSignal(L.Callback):
    """On SIGTERM Lightning finishes the step and raises SIGTERMException; this writes last.ckpt first.

    Outside SLURM, SIGUSR1 is routed to the same handler (under SLURM, Lightning's own USR1 handler checkpoints
    and requeues). The checkpoint goes where ModelCheckpoint keeps `last.ckpt`, so `ckpt_path=last` resumes it.
    """

    def on_train_start(self, trainer, pl_module):
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signal.SIGUSR1, signal.getsignal(signal.SIGTERM))

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return
        path = f"{callback.dirpath}/{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(f"stopped by a signal at step {trainer.global_step}: saved {path}")
