"""Latent vs pixel diffusion: the cost of a training step of the same U-Net config on the same data.

    python benchmarks/latent_cost.py [--quick]

For the 8x8 and 16x16 digits: DDPM on the pixels, DDPM on the latents of a KL autoencoder (f = 2, 2 channels:
4x4x2 and 8x8x2 latents) encoding every batch, and the same from a latent cache (the data set encoded once).
The U-Net config is `network=unet_tiny` in every row (attention at the lowest resolution); only its input size
differs. The autoencoder is trained briefly first (its quality does not change the cost). Steps are timed inside
Lightning fits (median over steps, then over interleaved rounds).
"""

import tempfile
from pathlib import Path

import torch

from _common import arguments, compose, header, interleaved, median, table
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.train import train
from training_overhead import StepTimer, step_time


def quiet_fit(data: str, steps: int) -> list[str]:
    return [f"data={data}", "logger=csv", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0"]


def train_autoencoder(data: str, steps: int, run_dir: str) -> Path:
    train(compose(["experiment=autoencoder", *quiet_fit(data, steps), "~callbacks.reconstruction_grid",
                   f"callbacks.checkpoint.every_n_train_steps={steps}"], run_dir))
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def seconds_per_step(overrides: list[str], steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        datamodule, model, trainer = build(compose(overrides, run_dir))
        timer = StepTimer()
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule=datamodule)
        return step_time(timer.stamps, warmup)


def main():
    args = arguments(__doc__.splitlines()[0])
    header("Latent vs pixel diffusion: ms per training step, same U-Net config, same data", args.quick)
    steps, warmup, rounds, ae_steps = (4, 1, 1, 2) if args.quick else (30, 5, 3, 200)
    rows = []
    with tempfile.TemporaryDirectory() as ae_dirs:
        for data, attn in (("digits", 4), ("digits16", 8)):
            ckpt = train_autoencoder(data, ae_steps, f"{ae_dirs}/{data}")
            base = quiet_fit(data, steps) + ["network=unet_tiny", "~callbacks.sample_grid", "~callbacks.final_samples",
                                             "~callbacks.checkpoint"]
            latent = ["first_stage=autoencoder", f"first_stage.ckpt_path={ckpt}", f"network.attn_resolutions=[{attn // 2}]"]
            variants = {
                "pixels": lambda: seconds_per_step(base + [f"network.attn_resolutions=[{attn}]"], steps, warmup),
                "latents, encoded per batch": lambda: seconds_per_step(base + latent, steps, warmup),
                "latents, cached": lambda: seconds_per_step(base + latent + ["model.latent_cache=true"], steps, warmup),
            }
            results = {name: median(v) for name, v in interleaved(variants, rounds).items()}
            for name, seconds in results.items():
                rows.append([data, name, 1e3 * seconds, seconds / results["pixels"]])
    table(f"ms per DDPM training step, batch 128 ({steps - warmup} steps x {rounds} rounds, medians)",
          ["data", "diffusion on", "ms/step", "ratio to pixels"], rows)


if __name__ == "__main__":
    main()
