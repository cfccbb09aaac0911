"""EDM's data set format: a zip of images with a `dataset.json` of labels (NVlabs/edm and edm2 `dataset_tool.py`).

`dataset.json` is `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}` (unlabeled); the images are
every entry with an image extension, in sorted order, as EDM reads them. Only the zip's directory and dataset.json
are read up front (checked: a missing dataset.json, labels naming absent images, images without a label, labels out
of range are refused naming the entry); every image is decoded once when the data are set up, as an image folder's
are (a truncated or corrupt PNG is refused naming its entry, or left out with `damaged=skip`), then again when it
is drawn, one zip handle per process. 16-bit greyscale is read at its own depth (`read_image`, shared with folders). Images of another size are brought to `image_size`
by ADM's centre crop (Dhariwal & Nichol 2021: box-halve, bicubic, crop; EDM's `center-crop-dhariwal`) or by an
antialiased resize of the short side and a centre crop.
"""

import json
import os
import zipfile
from functools import partial

import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DiffusionDataModule
from .integrity import CHANNELS, read_image, without_damaged

MODES = ("L", "RGB")
CROPS = ("adm", "resize")
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
LABELS = "dataset.json"


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the short side is >= 2 size, bicubic to size, crop the middle."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Antialiased resize of the short side to size, then the middle size x size (torchvision's Resize + CenterCrop)."""
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_index(path: str, num_classes: int | None) -> tuple[list[str], list[int] | None, int]:
    """(image entries in EDM's sorted order, their labels or None, num_classes) from the zip's directory and dataset.json."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data.path={path!r} is not a zip file (EDM's dataset_tool.py writes one: images + {LABELS})")
    with zipfile.ZipFile(path) as z:
        entries = set(z.namelist())
        if LABELS not in entries:
            raise ValueError(f"{path} has no {LABELS}: not an EDM dataset zip (dataset_tool.py writes one, "
                             f'{{"labels": null}} for unlabeled images)')
        try:
            labels = json.loads(z.read(LABELS))["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{path}: {LABELS} must be {{"labels": [[name, class], ...] or null}}: {err}') from err
    names = sorted(e for e in entries if os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ValueError(f"{path} holds no images (extensions {sorted(IMAGE_EXTENSIONS)[:6]}...)")
    if labels is None:
        return names, None, 0
    by_name = {str(name).replace("\\", "/"): label for name, label in labels}
    absent = sorted(set(by_name) - set(names))
    if absent:
        raise ValueError(f"{path}: {LABELS} labels the entry {absent[0]!r}, which is not an image in the zip")
    unlabeled = [n for n in names if n not in by_name]
    if unlabeled:
        raise ValueError(f"{path}: the image {unlabeled[0]!r} has no label in {LABELS} ({len(unlabeled)} unlabeled)")
    values = [by_name[n] for n in names]
    bad = next((n for n, v in zip(names, values) if type(v) is not int or v < 0), None)  # JSON's true is no class
    if bad is not None:
        raise ValueError(f"{path}: the label {by_name[bad]!r} of {bad!r} is not a class index (an int >= 0); "
                         "vector labels are not supported")
    num_classes = max(values) + 1 if num_classes is None else num_classes
    bad = next((n for n, v in zip(names, values) if v >= num_classes), None)
    if bad is not None:
        raise ValueError(f"{path}: the label {by_name[bad]} of {bad!r} is outside 0..{num_classes - 1} "
                         f"(data.num_classes={num_classes})")
    return names, values, num_classes


class ZipImages(Dataset):
    """(x, y) from the entries of a zip: x (C, S, S) in [-1, 1] decoded on access, y long (0 when unlabeled)."""

    def __init__(self, path: str, names: list[str], labels: list[int] | None, image_size: int, mode: str, crop: str):
        self.path, self.names, self.labels = path, names, labels
        self.image_size, self.mode, self.crop = image_size, mode, crop
        self._zip: zipfile.ZipFile | None = None  # opened in the process that reads (a DataLoader worker)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        y = self.labels[i] if self.labels is not None else 0
        return self.decode(self.names[i]), torch.tensor(y, dtype=torch.long)

    def decode(self, name: str) -> torch.Tensor:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        fit = adm_center_crop if self.crop == "adm" else resize_center_crop
        try:
            with self._zip.open(name) as f:
                return read_image(f, self.mode, self.image_size, fit)
        except (OSError, ValueError, zipfile.BadZipFile) as err:  # PIL's truncated / unidentified image, a bad CRC
            raise ValueError(f"cannot read the image {name!r} in {self.path}: {err}") from err


class ZipDataModule(DiffusionDataModule):
    """An EDM / EDM2 dataset zip as (x, y) pairs, square images in [-1, 1]; `image_size` null: the first image's side.

    Args:
        crop: how an image of another size becomes image_size: "adm" (ADM's centre crop) or "resize".
        damaged: what the set-up scan does with images that cannot be decoded: "error" names every one, "skip" leaves
            them out and says how many.
        num_classes: null: the largest label + 1; labels outside 0..num_classes-1 are refused.
    """

    def __init__(self, path: str, image_size: int | None = None, mode: str = "RGB", crop: str = "adm",
                 num_classes: int | None = None, hflip: bool = False, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0, val_fraction: float = 0.01, damaged: str = "error"):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: accepted {list(MODES)}")
        if damaged not in ("error", "skip"):
            raise ValueError(f"damaged={damaged!r}: accepted 'error' (name every unreadable image) or 'skip'")
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r}: accepted {list(CROPS)}")
        if image_size is not None and not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size={image_size!r}: need an int >= 1, or null for the zip's own resolution")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.path={path!r} does not exist: give an EDM dataset zip (dataset_tool.py)")
        super().__init__(batch_size, num_workers, seed, val_fraction, hflip)
        self.path, self.mode, self.crop, self.damaged = path, mode, crop, damaged
        self.names, self.labels, self.num_classes = read_index(path, num_classes)
        if image_size is None:
            with zipfile.ZipFile(path) as z, z.open(self.names[0]) as f, Image.open(f) as im:
                if im.size[0] != im.size[1]:
                    raise ValueError(f"{path}: the first image {self.names[0]!r} is {im.size[0]}x{im.size[1]}, not "
                                     "square: set data.image_size to crop every image to a square")
                image_size = im.size[0]
        self.image_size = image_size
        self.shape = (CHANNELS[mode], image_size, image_size)

    def load(self) -> Dataset:
        images = ZipImages(self.path, self.names, self.labels, self.image_size, self.mode, self.crop)
        with zipfile.ZipFile(self.path) as z:  # read from the scan's threads: ZipFile reads are thread-safe
            rows = ({"path": name, "read": partial(z.read, name)} for name in self.names)
            return without_damaged(images, rows, self.path, self.damaged)
