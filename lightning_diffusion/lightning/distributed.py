"""A hang between ranks becomes an error: the process group's timeout (trainer=ddp / slurm set one) ends a
collective that waits too long, and the error is said again naming the rank, the collective and who called it."""

import contextlib
import traceback

import torch.distributed as dist

TIMEOUT_MARKS = ("Timed out waiting", "Watchdog caught collective operation timeout", "timed out after")  # gloo, NCCL


class CollectiveTimeout(RuntimeError):
    """A collective (all-reduce, all-gather, barrier, broadcast) did not complete within the process-group timeout."""


def _where(err: BaseException) -> tuple[str, str]:
    """(the torch.distributed collective, the innermost caller of ours or Lightning's) from the traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    collective = next((f.name for f in reversed(frames) if "torch/distributed" in f.filename), "a collective")
    caller = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name})" for f in reversed(frames)
                   if "lightning_diffusion" in f.filename or "lightning/" in f.filename), "unknown")
    return collective, caller


@contextlib.contextmanager
def collectives_watched(last_checkpoint: str | None):
    """Re-raise a collective's timeout as a CollectiveTimeout that names the rank, the operation and its caller."""
    try:
        yield
    except RuntimeError as err:
        if not any(mark in str(err) for mark in TIMEOUT_MARKS) or isinstance(err, CollectiveTimeout):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        collective, caller = _where(err)
        raise CollectiveTimeout(
            f"rank {rank}: {collective}, called from {caller}, did not complete within the process-group timeout "
            f"(trainer.strategy.timeout): another rank is stuck or gone. The last checkpoint, {last_checkpoint or 'none'}"
            f", is whole (writes are atomic); resume from it. Original error: {err}") from err
