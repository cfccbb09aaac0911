"""scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, so offline), as (1, H, W) images in [-1, 1]."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from .base import DiffusionDataModule


class DigitsDataModule(DiffusionDataModule):
    """The 1797 UCI digits, pixels [0, 16] -> [-1, 1], optionally resized (bilinear, antialiased); 10 classes."""

    def __init__(self, image_size: int = 8, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, hflip: bool = False):
        if not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size={image_size!r}: need an int >= 1 (8 is the native size)")
        super().__init__(batch_size, num_workers, seed, val_fraction, hflip)
        self.image_size = image_size
        self.shape, self.num_classes = (1, image_size, image_size), 10

    def load(self) -> TensorDataset:
        digits = load_digits()
        x = torch.from_numpy(digits.images).float()[:, None] / 8 - 1
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp(-1, 1)
        return TensorDataset(x, torch.from_numpy(digits.target).long())
