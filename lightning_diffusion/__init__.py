"""lightning_diffusion: DDPM, NCSN, score-SDE, EDM, rectified-flow and latent diffusion on one formulation.

Layers, each importing only the ones below it:
    train, sample, evaluate, tables, sweep, posthoc_ema, train_extractor   the entry points (this folder)
    lightning/   LightningModules, data, callbacks, metrics glue, checkpoint and run I/O, the builder
    networks/    plain nn.Modules: the denoisers' F and latent diffusion's first stage
    core/        the math, plain torch: processes, parameterizations, weightings, losses, samplers, likelihood
"""

__version__ = "0.1.0"
