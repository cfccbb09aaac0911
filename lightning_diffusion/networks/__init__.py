"""Networks: plain `nn.Module`s with the signature `forward(x, c_noise, labels=None)` (the denoisers' F; the image
U-Nets also take EDM's `augment_labels=None`), and latent diffusion's first stage. They import the math at most; how a
network sees the noise level is the parameterization's.
"""
