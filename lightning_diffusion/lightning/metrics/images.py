"""Images as torch-fidelity's extractors read them: uint8 RGB tensors, or a folder read the way torch-fidelity reads it."""

from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.utils import prepare_input_from_descriptor

from ..data.base import to_uint8


class Uint8Images(Dataset):
    """A uint8 (N, 3, H, W) tensor as a torch-fidelity input data set."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def fidelity_images(x: Tensor) -> Tensor:
    """Model-space images in [-1, 1] (N, C, H, W) -> what torch-fidelity's extractors read: uint8 RGB (N, 3, H, W).

    Exactly what saving PNGs and reading them back through torch-fidelity's folder input gives (grey -> RGB).
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)} (2-D toy data "
                         f"have no image metrics; use distances.energy_distance)")
    x = to_uint8(x.cpu())
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def image_folder(path, find_deep: bool = False) -> Dataset:
    """A folder of PNG / JPG images as torch-fidelity itself reads it (sorted paths, PIL -> RGB uint8)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"images={path} is not a folder of images")
    return prepare_input_from_descriptor({"input": str(path)}, samples_find_deep=find_deep, verbose=False)
