"""A trained autoencoder, frozen, as latent diffusion's map between data and latents (Rombach et al. 2022)."""

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from .autoencoders import KLAutoencoder, gaussian_sample
from .checkpoints import find_run_config

TRAIN_ONE = "train one with `python -m lightning_diffusion.train experiment=autoencoder`"


class FirstStage(nn.Module):
    """x -> z = s (mu(x) + sigma(x) eps) and z -> Dec(z / s), with the autoencoder frozen and always in eval mode.

    s = 1 / std(z) from the autoencoder's validation latents, so the diffusion runs on unit-variance latents
    (LDM sec. 4.3.2 and appendix G; Stable Diffusion's 0.18215).
    """

    def __init__(self, autoencoder: KLAutoencoder, scale: float):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"the latent scale must be > 0, got {scale}")
        self.autoencoder, self.scale = autoencoder.requires_grad_(False).eval(), float(scale)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: Lightning's model.train() does not switch it

    @property
    def data_shape(self) -> tuple[int, int, int]:
        ae = self.autoencoder
        return (ae.in_channels, ae.image_size, ae.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    def check_data(self, shape) -> None:
        if tuple(shape) != self.data_shape:
            raise ValueError(f"the first stage was trained on data of shape {self.data_shape}, but these data are "
                             f"{tuple(shape)}: use the same data (and data.image_size) as the autoencoder's run")

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tensor:
        """[mu, log sigma^2] of q(z | x), unscaled: what a latent cache stores."""
        return self.autoencoder.encode(x)

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A scaled latent drawn from cached moments."""
        return self.scale * gaussian_sample(moments, generator)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample(self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale)

    @classmethod
    def load(cls, ckpt_path: str) -> "FirstStage":
        """The autoencoder (its EMA weights, when EMA was on) and latent scale from a checkpoint of its training run."""
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"first-stage checkpoint {ckpt_path} does not exist: {TRAIN_ONE} and give its "
                                    "checkpoints/last.ckpt as model.first_stage.ckpt_path")
        cfg = OmegaConf.load(find_run_config(path))
        if not str(cfg.model.get("_target_", "")).endswith("AutoencoderModel"):
            raise ValueError(f"{ckpt_path} is a checkpoint of {cfg.model.get('_target_')}, not of an autoencoder: "
                             f"{TRAIN_ONE}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if checkpoint.get("latent_scale") is None:
            raise ValueError(f"{ckpt_path} has no latent_scale (the autoencoder's run saved it before its first "
                             "validation, or had val_fraction=0): validate it once, e.g. resume it for a few steps")
        autoencoder = instantiate(cfg.network)
        prefix = "network."
        weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        autoencoder.load_state_dict(weights)
        return cls(autoencoder, checkpoint["latent_scale"])
