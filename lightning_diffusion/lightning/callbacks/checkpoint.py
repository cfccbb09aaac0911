"""Lightning's ModelCheckpoint, with last.ckpt also written after the final step."""

import lightning as L

from ..compat import save_last_now


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt (save_last=True) also written after the final step.

    Lightning (2.6) writes last.ckpt at the end only when no last.ckpt was written during the run, so with
    `every_n_train_steps` it held the weights of the last multiple of that; and it writes it in on_train_end, after
    EMA has copied the average into the model, so a run resumed from it trained on from the EMA weights. Here it
    is written where the periodic ones are (after the step reaching max_steps, or the last epoch), so it resumes
    exactly.
    """

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if 0 < trainer.max_epochs <= trainer.current_epoch + 1:
            self._save_final(trainer)

    def _save_final(self, trainer) -> None:
        if self.save_last:
            save_last_now(self, trainer)
