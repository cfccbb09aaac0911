"""The one LightningModule every family shares: a choice along each axis of the design space.

A family is a config that picks a process, a parameterization, a weighting w(t), a noise-level draw p(t), a loss and
a default sampler (conf/model/); the module composes them, and the math lives in `core`. Latent diffusion is the same
module with a frozen first stage: the family runs on its scaled latents and samples are decoded.
"""

import functools
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ...core.denoiser import Denoiser
from ...core.losses import denoising_loss
from ...core.noise_levels import AdaptiveDraw, stratified_draws, uniform_draws
from ...core.parameterizations import Parameterization
from ...core.processes import Process
from ...core.samplers import classifier_free_guidance, generate
from ...core.transforms import apply_transforms
from ...networks.first_stage import FirstStage
from ..compat import attached_trainer
from ..data.augment import AugmentPipe
from .gradient_checkpointing import checkpoint_blocks
from .logsnr_bins import LogsnrBins
from .optim import with_linear_warmup


def check_options(process: Process, label_dropout: float, learned_variance: bool, nonfinite: str,
                  cache_without_first_stage: bool, guidance_scale: float, num_classes: int) -> None:
    """A ValueError naming the value and what is accepted, before anything is built."""
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be a probability in [0, 1], got {label_dropout}")
    if learned_variance and not process.discrete:
        raise ValueError(f"learned_variance=True is improved DDPM's (a DiscreteDDPM process), got {process!r}: "
                         "use learned_variance=false, or model=ddpm")
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
    if cache_without_first_stage:
        raise ValueError("latent_cache=True caches a first stage's latents, but there is no first_stage "
                         "(pick one with first_stage=..., or latent_cache=false)")
    if guidance_scale != 1.0 and num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale} needs labelled data, but num_classes=0 "
                         "(use guidance_scale=1.0, or a data set with labels)")


class DiffusionModel(L.LightningModule):
    """Trains D(x_t, t) with L = E_{t ~ p(t)} [w(t) ||eps_hat - eps||^2] and draws samples with any sampler and grid.

    Args:
        noise_levels: the noise-level draw, u in [0, 1) -> t (an inverse CDF from `core.noise_levels`);
            `stratified` spreads the global batch's uniforms over strata across DDP ranks (k-diffusion).
        sampler, grid: what `generate` uses unless told otherwise (conf/sampler/, conf/grid/).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance training,
            Ho & Salimans 2022); `guidance_scale` is the default w at sampling (1 = plain conditional).
        logsnr_bins: edges of the logsnr bins in which the loss is also logged.
        first_stage: a frozen autoencoder: the family then runs on its scaled latents (latent diffusion, Rombach et
            al. 2022) and samples are decoded; `latent_cache` encodes the data set once when fitting starts
            (each step then draws z from the cached q(z | x)) instead of encoding every batch.
        augment: EDM's non-leaking augmentation of each training batch on the device; its labels condition the
            network (which needs `augment_dim` = the pipe's dim) and are zero (absent) at sampling.
        compile_network: torch.compile the network in place (nn.Module.compile) when fitting starts.
        gradient_checkpointing: class names of the network's blocks to recompute in backward (memory for compute).
        transforms: denoiser transforms every sampling applies (core.transforms: x0 clipping, dynamic thresholding),
            the run's `transforms`; `sample` / `evaluate` take others with transforms=[...].
    """

    def __init__(
        self,
        network: nn.Module,
        process: Process,
        parameterization: Parameterization,
        weighting: Callable,
        noise_levels: Callable,
        sampler: Callable,
        grid: Callable,
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
        augment: AugmentPipe | None = None,
        compile_network: bool = False,
        gradient_checkpointing: Sequence[str] = (),
        transforms: Sequence[Callable] = (),
    ):
        super().__init__()
        check_options(process, label_dropout, learned_variance, nonfinite, latent_cache and first_stage is None,
                      guidance_scale, num_classes)
        if augment is not None:
            augment.check_network(network, latent=first_stage is not None)
        if gradient_checkpointing:
            checkpoint_blocks(network, gradient_checkpointing)
        self.denoiser = Denoiser(network, parameterization, process, learned_variance)
        self.process, self.weighting, self.noise_levels = process, weighting, noise_levels
        self.adaptive = isinstance(noise_levels, AdaptiveDraw)  # importance sampling: learns p(t) from the losses
        self.sampler, self.grid, self.optimizer_factory = sampler, grid, optimizer
        self.sample_shape = tuple(sample_shape)
        self.num_classes, self.label_dropout, self.guidance_scale = num_classes, label_dropout, guidance_scale
        self.stratified, self.lr_warmup_steps = stratified, lr_warmup_steps
        self.bins = LogsnrBins(logsnr_bins)
        self.uncertainty, self.loss_fn = uncertainty, loss
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self._rank_stream_restored = False
        self.first_stage, self.latent_cache = first_stage, latent_cache
        self.augment, self.compile_network, self._compiled = augment, compile_network, False
        if isinstance(transforms, str) or not all(callable(t) for t in transforms):
            raise ValueError(f"transforms={transforms!r} must be a list of denoiser transforms (core.transforms, "
                             "e.g. [{_target_: lightning_diffusion.core.transforms.clip_x0, _partial_: true}]) or []")
        apply_transforms(lambda x, t: x, transforms)  # their options are checked when a denoiser is wrapped: now
        self.transforms = list(transforms)

    def dry_run(self, shape: Sequence[int]) -> None:
        """One pass of the chosen noise levels, weighting and denoiser on two zero samples, and the sampling grid on
        the process (their errors surface here, not after training)."""
        self.grid(self.process)
        t = self.noise_levels(torch.tensor([0.25, 0.75], dtype=torch.float64), self.process)
        self.weighting(t, self.process)
        labels = torch.full((2,), self.num_classes) if self.num_classes else None
        extra = {"augment_labels": torch.zeros(2, self.augment.dim)} if self.augment is not None else {}
        with torch.no_grad():
            self.denoiser(torch.zeros(2, *shape), t, labels, **extra)

    # ---- training ---------------------------------------------------------------------------------------------------
    def _world_size(self) -> int:
        """Processes training together; 1 with no Trainer attached (the model used alone, as in tests)."""
        trainer = attached_trainer(self)
        return trainer.world_size if trainer is not None else 1

    def draw_noise_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.stratified:
            u = stratified_draws(n, self.global_rank, self._world_size(), generator)
        else:
            u = uniform_draws(n, generator)
        return self.noise_levels(u, self.process).to(self.device)

    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Replace labels by the null label `num_classes` with probability label_dropout."""
        if labels is None or self.num_classes == 0:
            return None
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def loss(self, x0: Tensor, labels: Tensor | None, t: Tensor, noise: Tensor,
             augment_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss and logsnr: the configured loss (denoising, hybrid, VLB), then EDM2's uncertainty if on."""
        denoiser = self.denoiser if augment_labels is None else functools.partial(self.denoiser,
                                                                                  augment_labels=augment_labels)
        loss, logsnr = self.loss_fn(denoiser, x0, t, noise, self.weighting, self.process, labels)
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

    def setup(self, stage: str) -> None:
        # after the callbacks' setup (the EMA's copy stays eager: it is only evaluated); once per fit / validate / test
        if self.compile_network and not self._compiled:
            self.denoiser.network.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        if self.latent_cache:
            self.trainer.datamodule.encode_splits(lambda x: self.first_stage.moments(x.to(self.device)).cpu())

    def _step(self, batch, stage: str, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(per-sample loss, its mean, logsnr) of one batch."""
        x, labels = batch
        augment_labels = None
        if stage == "train" and self.augment is not None:  # EDM's augmentation, drawn from the run's RNG stream
            x, augment_labels = self.augment(x, generator)
        x0 = self.to_latent(x, generator)
        labels = self.drop_labels(labels) if stage == "train" else (labels if self.num_classes else None)
        t = self.draw_noise_levels(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        loss, logsnr = self.loss(x0, labels, t, noise, augment_labels)
        if stage == "train" and self.adaptive:  # importance sampling learns p(t) from every rank's losses
            self.noise_levels.update(*self.all_gather_flat(t, loss.detach()))
        if self.adaptive:  # the factor that keeps the objective that of uniform t
            loss = loss * self.noise_levels.reweight(t).to(loss)
        self.log(f"{stage}/loss", loss.mean(), prog_bar=True, sync_dist=stage != "train", batch_size=x0.shape[0])
        return loss, loss.mean(), logsnr

    def all_gather_flat(self, *tensors: Tensor) -> list[Tensor]:
        """Each tensor gathered from every rank and flattened (identity on one process)."""
        if self.trainer.world_size == 1:
            return list(tensors)
        return [self.all_gather(x).flatten() for x in tensors]

    def training_step(self, batch, batch_idx):
        per_sample, loss, logsnr = self._step(batch, "train")
        if self.global_step % self.trainer.log_every_n_steps == 0:  # this rank's own bins: no collective
            self.log_dict(self.bins.means(self.bins.names, *self.bins.sums_and_counts(per_sample, logsnr),
                                          "train/loss_logsnr"), batch_size=len(per_sample))
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

    def on_validation_epoch_start(self) -> None:
        self.bins.reset()

    def validation_step(self, batch, batch_idx):
        # the same noise for every validation pass, so the curve measures the model, not the draw
        per_sample, loss, logsnr = self._step(batch, "val", torch.Generator().manual_seed(10_000 + batch_idx))
        self.bins.add(per_sample, logsnr)
        return loss

    def on_validation_epoch_end(self) -> None:
        # every rank reduces every bin's sum and count once per validation, empty bins included; the bins with samples
        # are then the same on every rank, so logging them (synced) pairs too
        both = torch.stack([self.bins.sums, self.bins.counts]).to(self.device)
        both = self.trainer.strategy.reduce(both, reduce_op="sum") if self.trainer.world_size > 1 else both
        self.log_dict(self.bins.means(self.bins.names, *both.cpu(), "val/loss_logsnr"), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the random stream of noise levels, noise and label dropout of every rank (every rank saves together), so
        # a resumed run draws what the original would
        checkpoint["rng_state"] = torch.get_rng_state()
        if self._world_size() > 1:
            checkpoint["rank_rng_states"] = self.all_gather(checkpoint["rng_state"].to(self.device)).cpu()
        if self.adaptive:  # importance sampling's loss history
            checkpoint["noise_levels"] = self.noise_levels.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        states = checkpoint.get("rank_rng_states")
        self._rank_stream_restored = states is not None and len(states) == self._world_size()
        if self._rank_stream_restored:
            torch.set_rng_state(states[self.global_rank].clone())  # its own storage: a row view segfaults
        if self.adaptive and "noise_levels" in checkpoint:
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
                 sampler: Callable | None = None, grid: Callable | None = None,
                 generator: torch.Generator | None = None, on_call: Callable[[int], None] | None = None
                 ) -> tuple[Tensor, int]:
        """Draw n samples with `sampler` on `grid` (default: the model's); returns (samples, network evaluations)."""
        x, nfe = generate(sampler or self.sampler, grid or self.grid, self.guided_denoiser(labels, guidance_scale),
                          self.process, (n, *self.sample_shape), generator=generator, device=self.device,
                          on_call=on_call, transforms=self.transforms)
        if self.first_stage is not None:
            x = self.first_stage.decode(x.to(torch.get_default_dtype()))
        return x.to(torch.get_default_dtype()), nfe
