"""Loggers whose history survives resumes and whose failures never take a run down.

* `CSVLogger`: Lightning's, but a resumed run appends to <run_dir>/csv/metrics.csv (rows logged after the checkpoint
  it resumes from are replaced by the rerun's), where Lightning's deletes the file and starts over.
* `WandbLogger`: Lightning's, resuming the run directory's own W&B run (its id kept in <run_dir>/wandb_run_id), and
  falling back to offline logging, with a warning saying how to sync later, when the server cannot be reached or
  used: refused, no answer within `init_timeout` seconds, HTTP errors, bad credentials.
"""

import csv
import logging
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .artifacts import atomic_write

RUN_ID_FILE = "wandb_run_id"


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing metrics.csv: its rows before the first step logged now stay."""

    def __init__(self, log_dir: str) -> None:
        path = Path(log_dir) / self.NAME_METRICS_FILE
        with path.open(newline="") if path.is_file() else open(os.devnull) as f:
            self.history = list(csv.DictReader(f))
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning's warns and deletes metrics.csv; here it is read (above) and continued."""

    def save(self) -> None:
        if not (self.history and self.metrics):
            return super().save()
        first = min(int(row["step"]) for row in self.metrics)
        rows = [row for row in self.history if row.get("step") and int(float(row["step"])) < first] + self.metrics
        self.history, self.metrics = [], []
        self.metrics_keys = sorted(set().union(*rows))

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(Path(self.metrics_file_path), write)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger whose metrics.csv continues across resumes (see AppendingWriter)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_id(run_dir) -> str:
    """The W&B run id of a run directory: `wandb agent`'s (WANDB_RUN_ID) or the one kept in <run_dir>/wandb_run_id,
    made once (the first process to write it wins; DDP ranks and requeued jobs read the same)."""
    path = Path(run_dir) / RUN_ID_FILE
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:  # exclusive create
            f.write(secrets.token_hex(4))
    except FileExistsError:
        pass
    return path.read_text().strip()


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger that resumes the run directory's W&B run and degrades to offline, never failing a run.

    Args:
        init_timeout: seconds W&B may take to start the run online before it is started offline instead.
    """

    def __init__(self, *args, init_timeout: float = 20.0, **kwargs):
        if not init_timeout > 0:
            raise ValueError(f"init_timeout must be > 0 seconds, got {init_timeout}")
        import wandb

        kwargs.setdefault("settings", wandb.Settings(init_timeout=init_timeout))
        super().__init__(*args, **kwargs)
        self.init_timeout = init_timeout

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and not self._offline:
            try:
                return LightningWandbLogger.experiment.fget(self)
            except Exception as err:  # refused, timed out, HTTP error, bad key: W&B's errors have no common base
                self._go_offline(err)
        return LightningWandbLogger.experiment.fget(self)

    def _go_offline(self, err: Exception) -> None:
        import wandb

        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        # logged, not warnings.warn: PYTHONWARNINGS=ignore (or a warnings filter) must not hide where the logs went
        logging.getLogger(__name__).warning(
            f"W&B at {server} could not start this run ({type(err).__name__}: {err}); logging offline to "
            f"{self.save_dir}/wandb instead. Upload later with `wandb sync {self.save_dir}/wandb/offline-run-*`")
        if wandb.run is not None:
            wandb.finish(exit_code=1, quiet=True)
        wandb.teardown()  # the failed start can leave the run id held by W&B's service ("run ID ... is in use")
        self._offline = True
        self._wandb_init["mode"] = "offline"
        self._experiment = None
