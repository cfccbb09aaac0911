"""Training latent diffusion's first stage (Rombach et al. 2022, appendix G) through the shared `train` entry point."""

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.image import PeakSignalNoiseRatio

from ...networks.kl_autoencoder import KLAutoencoder, gaussian_kl, gaussian_sample, hinge_discriminator_loss
from .optim import with_linear_warmup


class AutoencoderModel(L.LightningModule):
    """L = rec(x, Dec(z)) + kl_weight KL(q(z | x) || N(0, I)) [+ lambda (-D(Dec(z))) + hinge loss of D, after disc_start].

    rec is the per-image sum of |x - x_hat| (l1) or (x - x_hat)^2 (l2); lambda = disc_weight ||grad rec|| /
    ||grad adv|| at the decoder's last layer (LDM's adaptive weight, Esser et al. 2021 eq. 7). One optimizer steps
    autoencoder and discriminator together: the generator term sees the discriminator's weights detached and the
    discriminator sees the reconstructions detached, so each gradient reaches only its own player.
    Validation logs MSE and PSNR; each checkpoint stores `latent_scale`, 1 / std of the saved weights' latents.
    """

    def __init__(self, network: KLAutoencoder, optimizer: Callable[..., torch.optim.Optimizer],
                 sample_shape: Sequence[int], reconstruction: str = "l1", kl_weight: float = 1e-6,
                 discriminator: nn.Module | None = None, disc_start: int = 0, disc_weight: float = 0.5,
                 lr_warmup_steps: int = 0):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if kl_weight < 0 or disc_weight < 0 or disc_start < 0:
            raise ValueError(f"kl_weight ({kl_weight}), disc_weight ({disc_weight}) and disc_start ({disc_start}) "
                             "must be >= 0")
        data_shape = (network.in_channels, network.image_size, network.image_size)
        if tuple(sample_shape) != data_shape:
            raise ValueError(f"the autoencoder is built for data of shape {data_shape}, the data are "
                             f"{tuple(sample_shape)}: set network.in_channels / network.image_size to match")
        self.network, self.discriminator, self.optimizer_factory = network, discriminator, optimizer
        self.reconstruction, self.kl_weight = reconstruction, kl_weight
        self.disc_start, self.disc_weight, self.lr_warmup_steps = disc_start, disc_weight, lr_warmup_steps
        self.val_psnr = PeakSignalNoiseRatio(data_range=(-1.0, 1.0))

    def dry_run(self, shape: Sequence[int]) -> None:
        with torch.no_grad():
            self.network(torch.zeros(2, *shape))

    def reconstruction_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        err = (x - recon).abs() if self.reconstruction == "l1" else (x - recon).square()
        return err.flatten(1).sum(1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        recon, moments = self.network(x)
        rec, kl = self.reconstruction_loss(x, recon).mean(), gaussian_kl(moments).mean()
        loss = rec + self.kl_weight * kl
        self.log_dict({"train/rec_loss": rec, "train/kl": kl}, batch_size=x.shape[0])
        if self.discriminator is not None and self.global_step >= self.disc_start:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (recon,)).mean()
            weight = self.disc_weight * self.adaptive_weight(rec, g_loss)
            d_loss = hinge_discriminator_loss(self.discriminator(x), self.discriminator(recon.detach()))
            loss = loss + weight * g_loss + d_loss
            self.log_dict({"train/g_loss": g_loss, "train/d_loss": d_loss, "train/adaptive_weight": weight},
                          batch_size=x.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def adaptive_weight(self, rec: Tensor, g_loss: Tensor) -> Tensor:
        """||grad_W rec|| / ||grad_W g_loss|| at the decoder's last layer W, clamped to [0, 1e4] (detached)."""
        last = self.network.last_layer
        (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
        (g_adv,) = torch.autograd.grad(g_loss, last, retain_graph=True)
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        g = torch.Generator().manual_seed(10_000 + batch_idx)  # the same posterior draws at every validation
        z = gaussian_sample(self.network.encode(x), g)
        recon = self.network.decode(z)
        self.val_psnr(recon, x)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=x.shape[0])
        self.log("val/mse", (recon - x).square().mean(), sync_dist=True, batch_size=x.shape[0])
        self.log("val/rec_loss", self.reconstruction_loss(x, recon).mean(), sync_dist=True, batch_size=x.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the scale of the weights being saved (the EMA's: callbacks' hooks ran first and put them in state_dict)
        prefix = "network."
        weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        checkpoint["latent_scale"] = self.latent_scale(weights)

    @torch.no_grad()
    def latent_scale(self, weights: dict[str, Tensor], num_samples: int = 512) -> float:
        """1 / std of posterior samples z ~ q(z | x) over a fixed subsample of the training data (LDM sec. 4.3.2)."""
        x = self.trainer.datamodule.train_tensor(num_samples).to(self.device)
        _, moments = functional_call(self.network, weights, (x,))
        z = gaussian_sample(moments, torch.Generator().manual_seed(0))
        return float(z.double().std()) ** -1

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Dec(mu(x)): the reconstruction through the posterior mean."""
        return self.network.decode(self.network.encode(x).chunk(2, dim=1)[0])

    def configure_optimizers(self):
        return with_linear_warmup(self.optimizer_factory(self.parameters()), self.lr_warmup_steps)
