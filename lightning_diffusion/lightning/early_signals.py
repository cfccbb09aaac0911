"""SIGTERM / SIGUSR1 recorded from an entry point's first lines on, before torch and Lightning are imported.

A job preempted while it starts (imports, data set-up, a checkpoint restore) would otherwise die of the default
action, unsaved and never requeued. Recorded here, the signal is taken over by CheckpointOnSignal when it installs
its own handlers, and acted on at the first stop point like any other (Lightning, finding a handler in place, also
leaves SIGUSR1 alone instead of installing its in-handler SLURM requeue). Standard library only, so it is cheap to
import first.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def record(signum, _frame) -> None:
    _received.append(signum)


def record_from_now() -> None:
    """Install the recorder for SIGTERM and SIGUSR1 (in an entry point's process only: never on a library import)."""
    for s in SIGNALS:
        signal.signal(s, record)


def take() -> int | None:
    """The first signal recorded and not taken yet (None if none), forgetting all of them."""
    first = _received[0] if _received else None
    _received.clear()
    return first
