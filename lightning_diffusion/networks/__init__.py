"""Networks: plain `nn.Module`s with the signature `forward(x, c_noise, labels=None)` (the denoisers' F), and latent
diffusion's first stage. They import the math at most; how a network sees the noise level is the parameterization's.
"""
