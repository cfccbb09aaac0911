"""Callbacks that draw images: sample grids during validation, the final samples (checked by a real-data classifier),
and an autoencoder's reconstructions."""

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..artifacts import save_grid, save_json, save_npz
from ..metrics.classifier import fit_classifier, label_accuracy
from ..models import AutoencoderModel, DiffusionModel
from .base import ForModel
from ..metrics.sharding import class_labels
from ..progress import sampling_bar
from .signals import Preempted, abandon_if_signalled, signal_callback, signals_watched


def log_image(trainer: L.Trainer, key: str, path: Path, step: int) -> None:
    """Send a saved PNG to every logger that takes images (W&B); others only keep the file."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=step)


class SampleGrid(ForModel):
    """Every `every_n_epochs` validations, draw `n` samples with the EMA weights and save / log a grid (a row per
    class for a conditional model)."""

    model_type = DiffusionModel

    def __init__(self, n: int = 64, every_n_epochs: int = 1, seed: int = 0):
        self.n, self.every_n_epochs, self.seed = n, every_n_epochs, seed

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # during validation the EMA weights are swapped in, so these are the EMA model's samples
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        labels = class_labels(self.n, pl_module.num_classes, pl_module.device)
        try:
            x, _ = pl_module.generate(self.n, labels, generator=torch.Generator().manual_seed(self.seed),
                                      on_call=lambda nfe: abandon_if_signalled(trainer))
        except Preempted:  # this batch's stop point (CheckpointOnSignal, after this callback) acts on the signal
            return
        path = save_grid(x, Path(trainer.default_root_dir) / "samples" / f"step{trainer.global_step:07d}.png", labels)
        log_image(trainer, "samples", path, trainer.global_step)


class ReconstructionGrid(ForModel):
    """At each validation, save / log the first `n` validation images (top row) over their reconstructions."""

    model_type = AutoencoderModel

    def __init__(self, n: int = 16):
        self.n = n

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        x = batch[0][: self.n]
        grid = torch.cat([x, pl_module.reconstruct(x)])
        path = save_grid(grid, Path(trainer.default_root_dir) / "reconstructions" / f"step{trainer.global_step:07d}.png",
                         nrow=x.shape[0])
        log_image(trainer, "reconstructions", path, trainer.global_step)


class FinalSamples(ForModel):
    """When fitting ends (EMA weights in place): draw guided samples, save grid + .npz, and score them.

    For labelled data, a classifier trained on the real training images labels the samples; the fraction labelled
    as the class asked for is logged as `final/classifier_accuracy` and written to `metrics.json`.
    """

    model_type = DiffusionModel

    def __init__(self, n_per_class: int = 50, n_unconditional: int = 256, seed: int = 0):
        self.n_per_class, self.n_unconditional, self.seed = n_per_class, n_unconditional, seed
        self.metrics: dict = {}

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        num_classes = pl_module.num_classes
        n = self.n_per_class * num_classes if num_classes else self.n_unconditional
        labels = class_labels(n, num_classes, pl_module.device)
        pl_module.eval()
        shown = trainer.progress_bar_callback is not None  # minutes of sampling on a CPU: say how far it is
        rank_zero_info(f"final samples: drawing {n}")
        try:
            with signals_watched(trainer), sampling_bar(pl_module, 1, f"final samples ({n})", shown) as bar:
                def on_call(nfe):
                    abandon_if_signalled(trainer)
                    bar.update()

                x, nfe = pl_module.generate(n, labels, generator=torch.Generator().manual_seed(self.seed),
                                            on_call=on_call)
        except Preempted:  # last.ckpt holds the last step already: requeue (the rerun draws these samples), exit
            signal_callback(trainer).stop_after_fit(trainer)
        run_dir = Path(trainer.default_root_dir)
        shown = slice(0, 10 * num_classes) if num_classes else slice(None)  # ten per class, a row each
        save_grid(x[shown], run_dir / "samples" / "final.png", labels[shown] if num_classes else None)
        save_npz(run_dir / "samples" / "final.npz", samples=x, labels=labels if labels is not None else torch.empty(0))
        self.metrics = {"final/nfe": nfe, "final/num_samples": n, "final/guidance_scale": pl_module.guidance_scale}
        datamodule = trainer.datamodule
        if num_classes:
            images, real_labels = datamodule.train_tensor(labels=True)
            classifier = fit_classifier(images, real_labels)
            self.metrics["final/classifier_accuracy"] = label_accuracy(classifier, x, labels)
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
        save_json(run_dir / "metrics.json", self.metrics)
        rank_zero_info("final samples: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in self.metrics.items()))


class FinalReconstructions(ForModel):
    """When an autoencoder's fitting ends (EMA weights in place): its reconstruction error on the whole validation
    split, `final/mse` and `final/psnr` (10 log10(range^2 / MSE), data in [-1, 1], the MSE pooled over every pixel as
    torchmetrics' PSNR pools it), logged, printed and written to `metrics.json` like the diffusion run's."""

    model_type = AutoencoderModel

    def __init__(self):
        self.metrics: dict = {}

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        pl_module.eval()
        squared, pixels, images = 0.0, 0, 0
        for x, _ in trainer.datamodule.val_dataloader():
            x = x.to(pl_module.device)
            squared += float((pl_module.reconstruct(x) - x).double().square().sum())
            pixels, images = pixels + x.numel(), images + x.shape[0]
        if not images:  # val_fraction=0: nothing held out to score
            return
        mse = squared / pixels
        self.metrics = {"final/mse": mse, "final/psnr": 10.0 * math.log10(4.0 / mse), "final/num_images": images}
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
        save_json(Path(trainer.default_root_dir) / "metrics.json", self.metrics)
        rank_zero_info("final reconstructions: " + ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))
