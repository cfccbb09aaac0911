"""Conversion of published weights into this project's networks (state-dict key tables, checked both ways):
diffusers models (`diffusers_unet`: UNet2DModel -> our UNet; `diffusers_models`: UNet2DModel / AutoencoderKL as they
are), score_sde_pytorch checkpoints (`score_sde`), NVlabs/edm exported state dicts (`edm`), each checked on reading
(`published`), and any of them written as a run of ours (`imported`)."""
