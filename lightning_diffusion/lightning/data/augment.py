"""EDM's non-leaking geometric augmentation (Karras et al. 2022, App. F.2; the transforms of Karras et al. 2020, ADA).

Each training image is flipped, scaled, rotated, stretched and translated, each with its own probability; the
parameters of what was applied form a 9-dim *augmentation label* the network is conditioned on, zero meaning "not
augmented". Sampling passes no label (zeros), so the augmentations never leak into the samples. Label layout
(EDM's, for its geometric set):

    [x-flip, y-flip, scale, rotation cos - 1, rotation sin, stretch w cos r, stretch w sin r, shift x, shift y]

The label is a function of the transform and the transform of the label: `transforms(labels)` rebuilds it. EDM
draws the stretch axis r over a full turn, where (w, r) and (-w, r + pi) share a label but are mutually inverse
stretches; the axis has period pi, so drawing it over a half-turn gives EDM's distribution of transforms and labels
and makes the label say which stretch was applied.

Geometric transforms are resampled with EDM's anti-aliasing: reflect padding, 2x upsampling with the `sym6` wavelet
low-pass, bilinear sampling, low-pass and 2x decimation (the filter pair reconstructs exactly, so only the warp
itself interpolates). Images drawn without a geometric transform are not resampled at all.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_DIM = 9

# Daubechies' least-asymmetric wavelet with 6 vanishing moments, decomposition low-pass (Daubechies 1992, sec. 8.1):
# orthonormal, sum sqrt(2)
SYM6 = (-0.007800708325034148, 0.0017677118642428036, 0.04472490177066578, -0.021060292512300564,
        -0.07263752278646252, 0.3379294217276218, 0.787641141030194, 0.4910559419267466, -0.048311742585633,
        -0.11799011114819057, 0.0034907120842174702, 0.015404109327027373)


def _rotation(phi: Tensor) -> Tensor:
    """(B, 2, 2) rotations by phi in image coordinates (x right, y down)."""
    c, s = phi.cos(), phi.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _homogeneous(linear: Tensor, shift: Tensor) -> Tensor:
    """(B, 3, 3) affine maps x -> linear x + shift."""
    out = torch.zeros(linear.shape[0], 3, 3, dtype=linear.dtype)
    out[:, :2, :2], out[:, :2, 2], out[:, 2, 2] = linear, shift, 1.0
    return out


class AugmentPipe:
    """EDM's geometric augmentation pipeline with augmentation labels (Karras et al. 2022, App. F.2; EDM's augment.py).

    Each transform is applied to an image with probability `p` times its multiplier (EDM's CIFAR-10 recipe: p = 0.12,
    multipliers xflip 1e8, i.e. every image is a candidate for the 50 % x-flip, and 1 for the rest). The spreads are
    EDM's: log2-scale and log2-stretch N(0, 0.2^2), rotation uniform over `rotate_max` turns, stretch axis rotated
    with probability 1/2, shift N(0, 0.125^2) of the image size. Called on a batch (B, C, H, W) it returns the
    augmented batch and its labels (B, 9); its randomness comes from `generator` (default: the global RNG, which a
    run seeds and its checkpoints restore).
    """

    dim = AUGMENT_DIM

    def __init__(self, p: float, xflip: float = 0.0, yflip: float = 0.0, scale: float = 0.0, rotate: float = 0.0,
                 aniso: float = 0.0, translate: float = 0.0, scale_std: float = 0.2, rotate_max: float = 1.0,
                 aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5, translate_std: float = 0.125):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability p={p}: need 0 <= p <= 1")
        multipliers = dict(xflip=xflip, yflip=yflip, scale=scale, rotate=rotate, aniso=aniso, translate=translate)
        for name, value in multipliers.items():
            if not value >= 0.0:
                raise ValueError(f"augmentation multiplier {name}={value}: need >= 0 (0 switches it off)")
        for name, value in dict(scale_std=scale_std, rotate_max=rotate_max, aniso_std=aniso_std,
                                translate_std=translate_std).items():
            if not value > 0.0:
                raise ValueError(f"augmentation spread {name}={value}: need > 0")
        if not 0.0 <= aniso_rotate_prob <= 1.0:
            raise ValueError(f"aniso_rotate_prob={aniso_rotate_prob}: need a probability in [0, 1]")
        self.p = p
        self.probability = {name: min(1.0, p * value) for name, value in multipliers.items()}
        self.scale_std, self.rotate_max, self.aniso_std = scale_std, rotate_max, aniso_std
        self.aniso_rotate_prob, self.translate_std = aniso_rotate_prob, translate_std

    def __repr__(self) -> str:
        return f"AugmentPipe(p={self.p}, probability={self.probability})"

    def check_network(self, network, latent: bool = False) -> None:
        """A ValueError, before any compute, unless `network` takes these labels (its `augment_dim` is 9) and sees
        images (not a first stage's latents: `latent`)."""
        if latent:
            raise ValueError("model.augment warps images, but this model diffuses a first stage's latents: use "
                             "model.augment=null with a first_stage")
        have = getattr(network, "augment_dim", 0)
        if have != self.dim:
            raise ValueError(f"the augmentation gives {self.dim}-dim augmentation labels, but the network "
                             f"{type(network).__name__} has augment_dim={have}: use a network with augment_dim="
                             f"{self.dim} (network.augment_dim={self.dim}), or no augmentation (model.augment=null)")

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Labels (n, 9) of n random augmentations, on the CPU in float64."""
        u = torch.rand(n, 11, generator=generator, dtype=torch.float64)
        z = torch.randn(n, 4, generator=generator, dtype=torch.float64)

        def on(column: int, name: str) -> Tensor:  # which images get this transform
            return (u[:, column] < self.probability[name]).double()

        xflip = on(0, "xflip") * (u[:, 1] < 0.5)
        yflip = on(2, "yflip") * (u[:, 3] < 0.5)
        scale = on(4, "scale") * z[:, 0]
        theta = on(5, "rotate") * (2 * u[:, 6] - 1) * math.pi * self.rotate_max
        w = on(7, "aniso") * z[:, 1]
        r = (u[:, 8] - 0.5) * math.pi * (u[:, 9] < self.aniso_rotate_prob)  # the stretch axis, over a half-turn
        shift = on(10, "translate")[:, None] * z[:, 2:]
        return torch.cat([torch.stack([xflip, yflip, scale, theta.cos() - 1, theta.sin(), w * r.cos(), w * r.sin()],
                                      dim=1), shift], dim=1)

    def transforms(self, labels: Tensor, height: int, width: int) -> Tensor:
        """(B, 3, 3) forward maps G of the geometric part of `labels`, in pixels about the image centre.

        The content at input point q lands at output point G q; G = shift . stretch . rotation . scale (EDM's order).
        """
        labels = labels.detach().to("cpu", torch.float64)
        s = torch.exp2(self.scale_std * labels[:, 2])
        theta = torch.atan2(labels[:, 4], labels[:, 3] + 1)
        # the stretch: w (cos r, sin r) with r in [-pi/2, pi/2), read back from the label
        a, b = labels[:, 5], labels[:, 6]
        r = torch.atan2(b, a)
        turned = (r >= math.pi / 2) | (r < -math.pi / 2)  # atan2 answered r + pi for this axis: w is negative
        r = torch.where(turned, r - math.pi * torch.sign(r), r)
        w = torch.where(turned, -1.0, 1.0) * torch.hypot(a, b)
        stretch = torch.exp2(self.aniso_std * w)
        eye = torch.eye(2, dtype=torch.float64).expand(len(labels), 2, 2)
        # EDM's conventions: rotation R(-theta), stretch R(-r) diag(k, 1/k) R(r)
        linear = (_rotation(-r) @ torch.diag_embed(torch.stack([stretch, 1 / stretch], -1)) @ _rotation(r)
                  @ _rotation(-theta) @ (s[:, None, None] * eye))
        shift = torch.stack([labels[:, 7] * width, labels[:, 8] * height], -1) * self.translate_std
        return _homogeneous(linear, shift)

    def apply(self, images: Tensor, labels: Tensor) -> Tensor:
        """The augmentation `labels` describe, applied to `images` (B, C, H, W): flips, then the geometric transform."""
        labels = labels.detach().to("cpu", torch.float64)  # as drawn: the warp's margins need no device sync
        flips = labels[:, :2].to(images.device, non_blocking=True)
        images = torch.where(flips[:, 0, None, None, None] > 0, images.flip(3), images)
        images = torch.where(flips[:, 1, None, None, None] > 0, images.flip(2), images)
        moved = (labels[:, 2:] != 0).any(1).nonzero().flatten()
        if len(moved) == 0:
            return images
        G = self.transforms(labels[moved], *images.shape[-2:])
        index = moved.to(images.device, non_blocking=True)
        out = images.clone()
        out[index] = warp(images[index], G).to(images.dtype)
        return out

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(augmented images, labels (B, 9) float32 on the images' device)."""
        if images.ndim != 4:
            raise ValueError(f"AugmentPipe augments image batches (B, C, H, W), got shape {tuple(images.shape)}")
        labels = self.draw(images.shape[0], generator)
        return self.apply(images, labels), labels.to(images.device, torch.float32)


def warp(images: Tensor, G: Tensor) -> Tensor:
    """images (B, C, H, W) resampled as G (B, 3, 3, about the centre) moves them, anti-aliased as EDM's pipeline.

    Reflect padding wide enough for every sampled point and the filter's reach, 2x upsampling with `sym6`, bilinear
    sampling of G^-1 p at every output point p, low-pass and 2x decimation, then the padding cropped. Computed in
    float32 (never under autocast): the result is data, not activations.
    """
    B, C, H, W = images.shape
    taps = len(SYM6)
    G_inv = torch.linalg.inv(G.to(torch.float64))
    # how far outside the image the output's corners are sampled, plus the filter's reach, per axis
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]], dtype=torch.float64)
    source = (G_inv @ corners.T).abs().amax(dim=(0, 2))
    mx = min(W - 1, max(0, math.ceil(float(source[0]) - cx) + taps // 2))
    my = min(H - 1, max(0, math.ceil(float(source[1]) - cy) + taps // 2))
    with torch.autocast(images.device.type, enabled=False):
        x = F.pad(images.float(), [mx, mx, my, my], mode="reflect")
        h = torch.tensor(SYM6, dtype=torch.float32, device=x.device)
        along_w, along_h = h.view(1, 1, 1, taps).expand(C, 1, 1, taps), h.view(1, 1, taps, 1).expand(C, 1, taps, 1)
        x = F.conv_transpose2d(F.conv_transpose2d(x, along_w, stride=(1, 2), groups=C), along_h, stride=(2, 1),
                               groups=C)
        grid = F.affine_grid(_normalized(G_inv, x.shape[-2:], taps).to(x), list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        x = F.conv2d(F.conv2d(x, along_w, stride=(1, 2), groups=C), along_h, stride=(2, 1), groups=C)
    return x[:, :, my:my + H, mx:mx + W]


def _normalized(G_inv: Tensor, size, taps: int) -> Tensor:
    """G^-1 as grid_sample's theta (B, 2, 3): output -> input in the upsampled canvas's [-1, 1] coordinates.

    A pixel at x (about the image centre) sits in the upsampled canvas of N points at 2 x + delta from its middle,
    delta = the filter's centroid - (taps - 1) / 2 (sym6 leans 0.40 of an upsampled pixel), so g = (2 x + delta) * 2
    / (N - 1).
    """
    h = torch.tensor(SYM6, dtype=torch.float64)
    delta = float((torch.arange(taps) * h).sum() / h.sum()) - (taps - 1) / 2
    (n_y, n_x) = size
    to_grid = torch.tensor([[4 / (n_x - 1), 0, 2 * delta / (n_x - 1)], [0, 4 / (n_y - 1), 2 * delta / (n_y - 1)],
                            [0, 0, 1]], dtype=torch.float64)
    return (to_grid @ G_inv @ torch.linalg.inv(to_grid))[:, :2]
