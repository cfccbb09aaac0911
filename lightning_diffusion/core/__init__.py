"""The math: plain torch (numpy, scipy), no Lightning, Hydra or W&B; every formula tested against an exact oracle.

processes (alpha(t), sigma(t)), parameterizations (c_skip, c_out, c_in, c_noise), denoiser, weightings w(t),
noise_levels (the training draw p(t)), losses, samplers (grids, solvers, samplers, generate), likelihood, oracles,
distances, power_ema (EDM2's post-hoc EMA).
"""
