"""Each private Lightning API lightning/compat.py wraps, exercised against the installed Lightning: an upgrade that
moves or changes one fails here, by name, not deep inside a run."""

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_diffusion.lightning.callbacks import EMA
from lightning_diffusion.lightning.compat import (attached_trainer, average_swapped_out, averaged_module,
                                                  callback_state_key, cluster_environment, save_last_now)


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Probe(L.Callback):
    """Calls each accessor where the package does, and records what it saw."""

    def __init__(self, ema: EMA, checkpoint: ModelCheckpoint):
        self.ema, self.checkpoint, self.seen = ema, checkpoint, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["attached"] = attached_trainer(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            saves = []
            save = trainer.save_checkpoint
            trainer.save_checkpoint = lambda *args, **kwargs: (saves.append(args[0]), save(*args, **kwargs))
            save_last_now(self.checkpoint, trainer)
            save_last_now(self.checkpoint, trainer)  # the same step: not written twice
            trainer.save_checkpoint = save
            self.seen["saves"] = saves
            self.seen["saved_step"] = torch.load(self.checkpoint.last_model_path, weights_only=False)["global_step"]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        swapped_in = weights(pl_module)  # WeightAveraging has swapped its average into the module for validation
        held = weights(averaged_module(self.ema))  # ...and holds the training weights meanwhile
        with average_swapped_out(trainer, pl_module):
            self.seen["inside"] = same(weights(pl_module), held)
        self.seen["after"] = same(weights(pl_module), swapped_in)
        self.seen["differ"] = not same(swapped_in, held)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    ema = EMA(half_life_steps=None, decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path_factory.mktemp("ckpt"), save_last=True, save_top_k=0)
    probe = Probe(ema, checkpoint)
    model = BoringModel()
    before = {"average": averaged_module(ema), "attached": attached_trainer(model)}
    trainer = L.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[ema, probe, checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model)
    return trainer, model, ema, checkpoint, probe.seen, before


def test_attached_trainer_is_none_alone_and_the_trainer_in_a_fit(fitted):
    trainer, model, _, _, seen, before = fitted
    assert before["attached"] is None and seen["attached"] is trainer


def test_averaged_module_is_none_before_fitting_and_the_average_after(fitted):
    _, model, ema, _, _, before = fitted
    assert before["average"] is None
    average = averaged_module(ema)
    assert isinstance(average, BoringModel) and average is not model
    # when fitting ends WeightAveraging copies its average into the model
    assert same(weights(average), weights(model))


def test_average_swapped_out_puts_the_training_weights_back_inside_validation(fitted):
    *_, seen, _ = fitted
    assert seen["differ"], "EMA with decay 0.5 after 3 steps must differ from the weights, or the test proves nothing"
    assert seen["inside"] and seen["after"]


def test_save_last_now_writes_last_ckpt_once_per_step(fitted):
    *_, seen, _ = fitted
    assert [p.rsplit("/", 1)[-1] for p in seen["saves"]] == ["last.ckpt"]
    assert seen["saved_step"] == 1  # the step it was called at


def test_callback_state_key_is_lightnings_own_format():
    """Checkpoints store callback states under this key: a new format would orphan every saved PostHocEMA state."""
    assert callback_state_key(EMA(), sigma_rels=(0.05, 0.1)) == "EMA{'sigma_rels': (0.05, 0.1)}"


def test_cluster_environment_is_the_one_lightning_chose(monkeypatch):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert isinstance(cluster_environment(trainer), LightningEnvironment)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)  # one device inside a SLURM job
    assert isinstance(cluster_environment(trainer), SLURMEnvironment)
