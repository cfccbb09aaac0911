"""Reading a trained model back from its run directory: the resolved config.yaml plus a checkpoint."""

import inspect
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from .artifacts import atomic_write

CONFIG_NAME = "config.yaml"


def save_run_config(cfg: DictConfig, run_dir) -> Path:
    """Write the fully resolved config to <run_dir>/config.yaml (what `load_model` and `tables` read back)."""
    path = Path(run_dir) / CONFIG_NAME
    return atomic_write(path, lambda tmp: OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), tmp))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written to a temporary file beside the target and renamed over it (os.replace).

    Lightning's own save stages the file in the system temp folder and moves it: where that folder is on another
    filesystem than the run (node-local /tmp, a shared run folder: most clusters) the move is a copy, and a kill
    during it leaves a truncated last.ckpt. Temporary files of saves killed earlier are removed first.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # object storage: Lightning's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*"):
            stale.unlink(missing_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


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
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def find_run_config(ckpt_path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (<run_dir>/checkpoints/x.ckpt -> <run_dir>/config.yaml)."""
    ckpt_path = Path(ckpt_path)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise FileNotFoundError(f"no {CONFIG_NAME} next to or above {ckpt_path}: a checkpoint is read together with the "
                            "resolved config its training run wrote to its run directory")


def check_checkpoint(ckpt_path) -> None:
    """Refuse a truncated, corrupt or foreign file before training resumes from it, naming the file and the fault."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {ckpt_path} cannot be read (truncated or corrupt?): {err}") from err
    missing = [k for k in ("state_dict", "global_step", "loops", "optimizer_states") if k not in checkpoint]
    if missing:
        raise ValueError(f"{ckpt_path} is not a lightning_diffusion training checkpoint: it has no {missing}")


def model_arguments(node: DictConfig, **arguments) -> dict:
    """The arguments the model's class (node._target_) takes: the autoencoder has no labels, guidance, first stage."""
    accepted = inspect.signature(get_class(node._target_)).parameters
    return {k: v for k, v in arguments.items() if k in accepted}


def load_model(ckpt_path, device: str = "cpu"):
    """(model with the checkpoint's weights (the EMA weights when EMA was on), resolved run config)."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    cfg = OmegaConf.load(find_run_config(ckpt_path))
    meta = cfg.data_meta
    model = instantiate(cfg.model, **model_arguments(cfg.model, network=instantiate(cfg.network),
                                                     sample_shape=meta.shape, num_classes=meta.num_classes))
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
        state = checkpoint["state_dict"]
    except Exception as err:  # a truncated file, or not a Lightning checkpoint at all
        raise ValueError(f"{ckpt_path} is not a readable lightning_diffusion checkpoint ({err})") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path} does not match the model in {find_run_config(ckpt_path)}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg
