"""The one LightningModule every family shares: a choice along each axis of the design space.

A family is a config that picks a process, a parameterization, a weighting w(t), a noise-level draw p(t) and a
default sampler (plus, rarely, a short subclass for what is truly its own, e.g. DDPM's learned variances).
The module composes them; the math lives in the plain-torch modules it imports.
"""

import inspect
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ..first_stage import FirstStage
from ..losses import denoising_loss
from ..noise_levels import importance_weight, stratified_draws, uniform_draws
from ..parameterizations import Denoiser, Parameterization
from ..processes import DiscreteDDPM, Process, expand_to
from ..samplers import classifier_free_guidance


def with_linear_warmup(optimizer: torch.optim.Optimizer, steps: int):
    """Lightning's configure_optimizers answer: the learning rate ramped linearly over the first `steps` steps."""
    if not steps:
        return optimizer
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class DiffusionModel(L.LightningModule):
    """Trains D(x_t, t) with L = E_{t ~ p(t)} [w(t) ||eps_hat - eps||^2] and samples with any core sampler.

    Args:
        noise_levels: u in [0, 1) -> t (an inverse CDF from `noise_levels`); `stratified` spreads the global
            batch's uniforms over strata across DDP ranks (k-diffusion).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance training,
            Ho & Salimans 2022); `guidance_scale` is the default w at sampling (1 = plain conditional).
        logsnr_bins: edges of the logsnr bins in which the training loss is also logged.
        first_stage: a frozen autoencoder: the family then runs on its scaled latents (latent diffusion, Rombach et
            al. 2022) and samples are decoded; `latent_cache` encodes the data set once when fitting starts
            (each step then draws z from the cached q(z | x)) instead of encoding every batch.
    """

    def __init__(
        self,
        network: nn.Module,
        process: Process,
        parameterization: Parameterization,
        weighting: Callable,
        noise_levels: Callable,
        sampler: Callable,
        optimizer: Callable[..., torch.optim.Optimizer],
        sample_shape: Sequence[int],
        num_classes: int = 0,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        stratified: bool = True,
        lr_warmup_steps: int = 0,
        logsnr_bins: Sequence[float] = (-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0),
        learned_variance: bool = False,
        uncertainty: nn.Module | None = None,
        loss: Callable = denoising_loss,
        nonfinite: str = "stop",
        first_stage: FirstStage | None = None,
        latent_cache: bool = False,
    ):
        super().__init__()
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be a probability in [0, 1], got {label_dropout}")
        if learned_variance and not isinstance(process, DiscreteDDPM):
            raise ValueError(f"learned_variance=True is improved DDPM's (a DiscreteDDPM process), got {process!r}: "
                             "use learned_variance=false, or model=ddpm")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if latent_cache and first_stage is None:
            raise ValueError("latent_cache=True caches a first stage's latents, but there is no first_stage "
                             "(use model=latent, or latent_cache=false)")
        if guidance_scale != 1.0 and num_classes == 0:
            raise ValueError(f"guidance_scale={guidance_scale} needs labelled data, but num_classes=0 "
                             "(use guidance_scale=1.0, or a data set with labels)")
        self.denoiser = Denoiser(network, parameterization, process, learned_variance)
        self.process, self.weighting, self.noise_levels, self.sampler = process, weighting, noise_levels, sampler
        self.optimizer_factory = optimizer
        self.sample_shape = tuple(sample_shape)
        self.num_classes, self.label_dropout, self.guidance_scale = num_classes, label_dropout, guidance_scale
        self.stratified, self.lr_warmup_steps = stratified, lr_warmup_steps
        self.logsnr_bins = torch.tensor(logsnr_bins, dtype=torch.float64)
        self.uncertainty, self.loss_fn = uncertainty, loss
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self._rank_stream_restored = False
        self.first_stage, self.latent_cache = first_stage, latent_cache

    def dry_run(self, shape: Sequence[int]) -> None:
        """One pass of the chosen noise levels, weighting and denoiser on two zero samples (their errors surface here)."""
        t = self.noise_levels(torch.tensor([0.25, 0.75], dtype=torch.float64), self.process)
        self.weighting(t, self.process)
        labels = torch.full((2,), self.num_classes) if self.num_classes else None
        with torch.no_grad():
            self.denoiser(torch.zeros(2, *shape), t, labels)

    # ---- training ---------------------------------------------------------------------------------------------------
    def draw_noise_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.stratified:
            u = stratified_draws(n, self.global_rank, self.trainer.world_size if self._trainer else 1, generator)
        else:
            u = uniform_draws(n, generator)
        return self.noise_levels(u, self.process).to(self.device)

    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Replace labels by the null label `num_classes` with probability label_dropout."""
        if labels is None or self.num_classes == 0:
            return None
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def loss(self, x0: Tensor, labels: Tensor | None, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample loss and logsnr: the configured loss (denoising, hybrid, VLB), then EDM2's uncertainty if on."""
        loss, logsnr = self.loss_fn(self.denoiser, x0, t, noise, self.weighting, self.process, labels)
        if self.uncertainty is not None:
            loss = self.uncertainty(loss, logsnr)
        return loss, logsnr

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A data batch -> what the diffusion runs on: x itself, or scaled latents (from cached moments if cached)."""
        if self.first_stage is None:
            return x
        return self.first_stage.sample(x, generator) if self.latent_cache else self.first_stage.encode(x, generator)

    def on_train_start(self) -> None:
        # every rank starts from the same seed: give each rank its own stream of noise, noise levels and label
        # dropout, derived deterministically from the shared one (a resumed run has its rank's own state back)
        if self.trainer.world_size > 1 and not self._rank_stream_restored:
            torch.manual_seed(int(torch.randint(2**62, (1,))) + self.global_rank)

    def on_fit_start(self) -> None:
        if self.latent_cache:
            self.trainer.datamodule.encode_splits(lambda x: self.first_stage.moments(x.to(self.device)).cpu())

    def _step(self, batch, stage: str, generator: torch.Generator | None = None) -> Tensor:
        x, labels = batch
        x0 = self.to_latent(x, generator)
        labels = self.drop_labels(labels) if stage == "train" else (labels if self.num_classes else None)
        t = self.draw_noise_levels(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        loss, logsnr = self.loss(x0, labels, t, noise)
        if stage == "train" and hasattr(self.noise_levels, "update"):  # importance sampling learns p(t) from losses
            self.noise_levels.update(*self.all_gather_flat(t, loss.detach()))
        loss = loss * importance_weight(self.noise_levels, t).to(loss)  # 1 unless p(t) is importance-sampled
        self.log(f"{stage}/loss", loss.mean(), prog_bar=True, sync_dist=stage != "train", batch_size=x0.shape[0])
        if stage != "train" or self.global_step % self.trainer.log_every_n_steps == 0:  # per-bin logging costs ~3 ms
            self.log_loss_per_logsnr_bin(loss.detach(), logsnr.detach(), stage)
        return loss.mean()

    def all_gather_flat(self, *tensors: Tensor) -> list[Tensor]:
        """Each tensor gathered from every rank and flattened (identity on one process)."""
        if self.trainer.world_size == 1:
            return list(tensors)
        return [self.all_gather(x).flatten() for x in tensors]

    def log_loss_per_logsnr_bin(self, loss: Tensor, logsnr: Tensor, stage: str) -> None:
        """Mean loss inside each logsnr bin, so weightings can be compared where they act (cf. improved DDPM's quartiles)."""
        edges = self.logsnr_bins.to(logsnr.device, logsnr.dtype)
        idx = torch.bucketize(logsnr, edges)
        names = [f"<{edges[0]:g}"] + [f"{a:g}..{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">{edges[-1]:g}"]
        for i, name in enumerate(names):
            mask = idx == i
            if mask.any():
                self.log(f"{stage}/loss_logsnr[{name}]", loss[mask].mean(), batch_size=int(mask.sum()),
                         sync_dist=stage != "train")

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if torch.isfinite(loss) or self.trainer.world_size > 1:
            # under DDP a non-finite loss goes through backward: the all-reduced gradient is then non-finite on every
            # rank and the gradient guard acts on all of them alike (a rank skipping alone would hang the others)
            return loss
        return self.on_nonfinite(f"loss {loss.detach().item()}")

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
            self.on_nonfinite("gradient")
            optimizer.zero_grad(set_to_none=True)  # 'skip': no parameter has a gradient, so the step changes nothing

    def on_nonfinite(self, what: str) -> None:
        """Stop with the step and the last good checkpoint named, or (nonfinite='skip') skip the step and count it."""
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_nonfinite_steps", float(self.skipped_steps))
            return None
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or "none written yet"
        raise FloatingPointError(f"non-finite {what} at step {self.global_step}; the last good checkpoint is {last} "
                                 "(it was not overwritten). Resume from it with a lower learning rate, or set "
                                 "model.nonfinite=skip to skip such steps.")

    def validation_step(self, batch, batch_idx):
        # the same noise for every validation pass, so the curve measures the model, not the draw
        g = torch.Generator().manual_seed(10_000 + batch_idx)
        return self._step(batch, "val", g)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the random stream of noise levels, noise and label dropout of every rank (every rank saves together), so
        # a resumed run draws what the original would
        checkpoint["rng_state"] = torch.get_rng_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            checkpoint["rank_rng_states"] = self.all_gather(checkpoint["rng_state"].to(self.device)).cpu()
        if hasattr(self.noise_levels, "state_dict"):  # importance sampling's loss history
            checkpoint["noise_levels"] = self.noise_levels.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        states = checkpoint.get("rank_rng_states")
        self._rank_stream_restored = states is not None and self._trainer is not None and \
            len(states) == self.trainer.world_size
        if self._rank_stream_restored:
            torch.set_rng_state(states[self.global_rank].clone())  # its own storage: a row view segfaults
        if "noise_levels" in checkpoint:
            self.noise_levels.load_state_dict(checkpoint["noise_levels"])

    def configure_optimizers(self):
        params = list(self.denoiser.parameters()) + (list(self.uncertainty.parameters()) if self.uncertainty else [])
        return with_linear_warmup(self.optimizer_factory(params), self.lr_warmup_steps)

    # ---- sampling ---------------------------------------------------------------------------------------------------
    def guided_denoiser(self, labels: Tensor | None, guidance_scale: float | None):
        """D(x, t) for the sampler: conditional with classifier-free guidance when labels are given."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if labels is None or self.num_classes == 0:
            if labels is not None:
                raise ValueError("labels were given, but this model is unconditional (num_classes=0)")
            return lambda x, t: self.denoiser(x, t, None)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels.min()}..{labels.max()}")
        return classifier_free_guidance(self.denoiser, labels, scale, self.num_classes)

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None = None, guidance_scale: float | None = None,
                 sampler: Callable | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """Draw n samples with `sampler` (default: the family's); returns (samples, number of network evaluations)."""
        sampler = sampler or self.sampler
        options = {"variance": self.reverse_variance} if self.uses_learned_variance(sampler) else {}
        x, nfe = sampler(denoiser=self.guided_denoiser(labels, guidance_scale), process=self.process,
                         shape=(n, *self.sample_shape), generator=generator, device=self.device, **options)
        if self.first_stage is not None:
            x = self.first_stage.decode(x.to(torch.get_default_dtype()))
        return x.to(torch.get_default_dtype()), nfe

    def uses_learned_variance(self, sampler: Callable) -> bool:
        """Whether sampling should use the learned variances: the model has them and the sampler takes a `variance`."""
        inner = getattr(sampler, "keywords", {}).get("sampler", sampler)
        return self.denoiser.learned_variance and "variance" in inspect.signature(inner).parameters

    def reverse_variance(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Improved DDPM's learned variance of p(x_s | x_t): exp(v' log beta + (1 - v') log beta~), v' = (v + 1) / 2.

        beta = 1 - alpha_t^2 / alpha_s^2 and beta~ = beta sigma_s^2 / sigma_t^2 for the (respaced) step t -> s
        (Nichol & Dhariwal 2021, eq. 15 and sec. 4); v is the network's output at (x, t) from the same evaluation
        (under guidance, the conditional half of the batch).
        """
        v = self.denoiser.last_variance[: x.shape[0]].to(torch.float64)
        a_t, s_t = self.process.alpha(t.to(torch.float64)), self.process.sigma(t.to(torch.float64))
        a_s, s_s = self.process.alpha(s.to(torch.float64)), self.process.sigma(s.to(torch.float64))
        beta = 1 - (a_t / a_s) ** 2
        beta_tilde = (beta * s_s**2 / s_t**2).clamp(min=1e-20)
        frac = (v + 1) / 2
        log_var = frac * expand_to(beta.log(), v) + (1 - frac) * expand_to(beta_tilde.log(), v)
        return log_var.exp().to(x.dtype)
