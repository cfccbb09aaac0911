"""An offline feature space for the built-in digits: a small CNN classifier registered with torch-fidelity.

`python -m lightning_diffusion.train_extractor [--out PATH]` trains it on the digits' train split and saves it;
then `feature_extractor=digits-cnn` runs torch-fidelity's own FID / KID / IS maths in its 64-d penultimate features
and 10 logits (the role Inception-V3's pool3 and logits play for FID and IS). Those numbers are named
`fd_digits-cnn`, `kd_digits-cnn_*`, `cs_digits-cnn_*` and are never comparable with Inception FID.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ...networks.digits_cnn import IMAGE_SIZE, DigitsCNN
from ..artifacts import default_cache_dir, save_torch
from ..data.base import from_uint8
from ..data.digits import DigitsDataModule
from ..progress import progress_bar
from .images import fidelity_images

NAME = "digits-cnn"


def to_digit_space(x: Tensor) -> Tensor:
    """uint8 (B, C, H, W), C = 1 or 3 (grey as RGB) -> (B, 1, 8, 8) in [-1, 1], resized like DigitsDataModule."""
    x = from_uint8(x).mean(1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE,) * 2, mode="bilinear", antialias=True, align_corners=False)
    return x


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor `digits-cnn`: a DigitsCNN's features '64' (FID / KID / PRC) and 'logits' (IS)."""

    TRAIN_COMMAND = "python -m lightning_diffusion.train_extractor --out <file>"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or self.default_weights_path()
        if not Path(path).is_file():
            raise FileNotFoundError(f"no {NAME} weights at {path}: train them with `{self.TRAIN_COMMAND}` and pass "
                                    f"feature_extractor_weights_path=<file>")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.net = DigitsCNN(**saved["hparams"])
        self.net.load_state_dict(saved["state_dict"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def default_weights_path() -> Path:
        return default_cache_dir() / f"{NAME}.pt"

    @staticmethod
    def get_provided_features_list():
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not (x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] in (1, 3)):
            raise ValueError(f"{NAME} reads uint8 images (B, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
        features, logits = self.net(to_digit_space(x))
        out = {"64": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, DigitsFeatureExtractor)


def train_digits_extractor(out, epochs: int = 20, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                           width: int = 16, feature_dim: int = 64, progress: bool = True) -> dict:
    """Train DigitsCNN on the digits' train split (DigitsDataModule seed 0), save it to `out`; returns its record.

    Images go through the same uint8 round trip as every evaluated image, so the extractor sees what it will read.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}: need both >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise the same weights on any machine, and far faster for a net this small
    try:
        return _train(out, epochs, seed, batch_size, lr, width, feature_dim, progress)
    finally:
        torch.set_num_threads(threads)


def _train(out, epochs, seed, batch_size, lr, width, feature_dim, progress) -> dict:
    torch.manual_seed(seed)
    data = DigitsDataModule(seed=0)
    x, y = data.train_tensor(labels=True)
    x_val = torch.stack([data.val_dataset[i][0] for i in range(len(data.val_dataset))])
    y_val = torch.stack([torch.as_tensor(data.val_dataset[i][1]) for i in range(len(data.val_dataset))])
    x, x_val = to_digit_space(fidelity_images(x)), to_digit_space(fidelity_images(x_val))
    net = DigitsCNN(width, feature_dim)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with progress_bar(epochs * math.ceil(len(x) / batch_size), "training digits-cnn", progress, "step") as bar:
        for epoch in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(batch_size):
                # a random shift of up to one pixel, so that slightly misplaced strokes still land on the class
                shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
                batch = torch.roll(x[idx], shifts=shift, dims=(-2, -1))
                loss = F.cross_entropy(net(batch)[1], y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3g}")
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_val)[1].argmax(1) == y_val).float().mean())
    record = {"state_dict": net.state_dict(), "hparams": {"width": width, "feature_dim": feature_dim},
              "val_accuracy": accuracy, "seed": seed, "epochs": epochs,
              "data": "sklearn digits, DigitsDataModule(seed=0, val_fraction=0.1) train split"}
    path = save_torch(record, Path(out).expanduser())
    return {"path": str(path), "val_accuracy": accuracy}
