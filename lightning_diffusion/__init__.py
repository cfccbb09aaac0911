"""lightning_diffusion: DDPM, NCSN, score-SDE, EDM, rectified-flow and latent diffusion on one formulation."""

__version__ = "0.1.0"
