"""Lightning's ModelCheckpoint, with last.ckpt also written after the final step."""

from pathlib import Path

import lightning as L

from ..compat import save_last_now


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt (save_last=True) also written after the final step.

    Lightning (2.6) writes last.ckpt at the end only when no last.ckpt was written during the run, so with
    `every_n_train_steps` it held the weights of the last multiple of that; and it writes it in on_train_end, after
    EMA has copied the average into the model, so a run resumed from it trained on from the EMA weights. Here it
    is written where the periodic ones are (after the step reaching max_steps, or the last epoch), so it resumes
    exactly.

    A save due on an epoch's last batch waits for the epoch's end: Lightning (2.6) resumes a checkpoint written inside
    the last batch into a miscounted epoch (the next epoch numbered one too far, so shuffled differently).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._due_at_epoch_end: tuple | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        """A run directory moved or copied: the checkpoints it names are read from where they are now, so a resumed
        run goes on overwriting its last.ckpt (Lightning forgets the path, and the next save became last-v1.ckpt)."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("last_model_path") or ""
        moved = self.dirpath is not None and state_dict.get("dirpath") not in (None, self.dirpath)
        if moved and saved and (Path(self.dirpath) / Path(saved).name).is_file():
            self.last_model_path = str(Path(self.dirpath) / Path(saved).name)

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        if trainer.is_last_batch:
            self._due_at_epoch_end = args
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        due, self._due_at_epoch_end = self._due_at_epoch_end, None
        if due is not None:  # the last batch's periodic (and final) save
            super().on_train_batch_end(trainer, pl_module, *due)
            if 0 < trainer.max_steps <= trainer.global_step:
                self._save_final(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if 0 < trainer.max_epochs <= trainer.current_epoch + 1:
            self._save_final(trainer)

    def _save_final(self, trainer) -> None:
        if self.save_last:
            save_last_now(self, trainer)
