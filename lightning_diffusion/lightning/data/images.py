"""Image data sets through HF `datasets`: a Hub name, a local image folder, or a `save_to_disk` directory.

All three become one `datasets.Dataset` (a folder through the packaged `imagefolder` builder: class
sub-folders -> labels, a flat folder -> unlabeled), decoded lazily to (C, H, W) tensors in [-1, 1].
Offline (HF_HUB_OFFLINE=1, or the Hub unreachable) a Hub name is served from the local cache or fails at
once with a message naming the local-path alternative, instead of after the HTTP client's retries.
"""

import io
import os

import datasets
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from ..offline import hub_access, hub_offline
from .base import DiffusionDataModule
from .integrity import CHANNELS, read_image, without_damaged

IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
LOCAL_HINT = "data.path=/path/to/folder_or_saved_dataset"


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_image(path: str) -> bool:
    return any(_is_image(f) for _, _, files in os.walk(path) for f in files)


def folder_classes(path: str) -> list[str]:
    """Class names of an image folder: its sub-folders holding images, or [] for a flat (unlabeled) folder."""
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    top_images = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    classes = sorted(e.name for e in entries if e.is_dir() and _has_image(e.path))
    if not top_images and not classes:
        raise ValueError(f"path={path!r} holds no images (extensions {sorted(IMAGE_EXTENSIONS)[:8]}...); give a "
                         f"folder of images, one of class sub-folders, or a save_to_disk directory")
    if top_images and classes:
        raise ValueError(f"path={path!r} mixes images at the top ({top_images[0]!r}, ...) with class sub-folders "
                         f"{classes}; put every image in a class sub-folder (labeled) or none (unlabeled)")
    return classes


class HFImages(Dataset):
    """(x, y) pairs from a `datasets.Dataset` with undecoded images: x (C, S, S) in [-1, 1], y long (0 if unlabeled)."""

    def __init__(self, ds: datasets.Dataset, image_column: str, label_column: str | None, image_size: int, mode: str):
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.image_size, self.mode = image_column, label_column, image_size, mode

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        y = row[self.label_column] if self.label_column else 0
        return self.decode(row[self.image_column], i), torch.tensor(y, dtype=torch.long)

    def decode(self, image: dict, i: int) -> torch.Tensor:
        """Decode one {bytes, path} image (`read_image`): `mode`, the short side resized and centre-cropped."""
        try:
            return read_image(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], self.mode,
                              self.image_size, fit_torchvision)
        except (OSError, ValueError, TypeError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read image {image.get('path') or f'row {i}'}: {e}") from e


def fit_torchvision(image: Image.Image, size: int) -> Image.Image:
    """The short side resized to `size` (antialiased), then the middle size x size: torchvision's Resize + CenterCrop."""
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


def _rows(batch: dict) -> list[dict]:
    """A columnar batch of `Dataset.iter` as rows."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


class ImageDataModule(DiffusionDataModule):
    """Images from a Hub name (`name`) or a local `path` (image folder or save_to_disk directory), square, in [-1, 1].

    Unlabeled data (a flat folder, or label_column=None) yields y = 0 and num_classes = 0. Validation holds out
    `val_fraction` of `split`, or is another split (`val_split`, e.g. CIFAR-10's test set, so all 50,000 training
    images train and give the FID reference). Every image is checked when the data are set up (`damaged`: `error`
    names every unreadable file; `skip` leaves them out and says how many).
    """

    def __init__(self, name: str | None = None, path: str | None = None, split: str = "train",
                 image_column: str = "image", label_column: str | None = "label", num_classes: int | None = None,
                 image_size: int = 32, mode: str = "RGB", hflip: bool = True, cache_dir: str | None = None,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.01,
                 val_split: str | None = None, damaged: str = "error"):
        if damaged not in ("error", "skip"):
            raise ValueError(f"damaged={damaged!r}: accepted 'error' (name every unreadable image) or 'skip'")
        if val_split is not None and val_fraction:
            raise ValueError(f"val_split={val_split!r} and val_fraction={val_fraction}: validate on a split or on a "
                             "held-out fraction, not both (set data.val_fraction=0 with a val_split)")
        if (name is None) == (path is None):
            raise ValueError(f"name={name!r}, path={path!r}: give exactly one, a Hugging Face Hub dataset name "
                             f"or a local {LOCAL_HINT}")
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"path={path!r} is not a directory; {LOCAL_HINT} (image folder or save_to_disk output)")
        if mode not in CHANNELS:
            raise ValueError(f"mode={mode!r}: accepted {sorted(CHANNELS)}")
        if not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size={image_size!r}: need an int >= 1")
        super().__init__(batch_size, num_workers, seed, val_fraction, hflip)
        self.name, self.path, self.split, self.cache_dir = name, path, split, cache_dir
        self.val_split, self.damaged = val_split, damaged
        self.image_column, self.image_size, self.mode = image_column, image_size, mode
        self.shape = (CHANNELS[mode], image_size, image_size)
        self.classes: list[str] | None = None
        if path is not None and not is_saved_dataset(path):  # an image folder: its layout fixes the labels
            self.classes = folder_classes(path)
            label_column = "label" if self.classes else None
            if num_classes is not None and num_classes != len(self.classes):
                raise ValueError(f"num_classes={num_classes} but path={path!r} has {len(self.classes)} class "
                                 f"sub-folders {self.classes}")
            num_classes = len(self.classes)
        elif path is not None:  # a saved dataset: its features are cheap to read (memory-mapped)
            features = self._load_saved().features
            for column in (image_column, label_column):
                if column is not None and column not in features:
                    raise ValueError(f"column {column!r} not in the saved dataset at {path!r}; columns: "
                                     f"{list(features)} (label_column=null for unlabeled data)")
            if label_column is not None and num_classes is None and isinstance(features[label_column],
                                                                                datasets.ClassLabel):
                num_classes = len(features[label_column].names)
        if label_column is None:
            num_classes = 0
        if label_column is not None and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes={num_classes!r} for label_column={label_column!r}: set data.num_classes "
                             f"(an int >= 1), or label_column=null for unlabeled data")
        self.label_column, self.num_classes = label_column, num_classes

    def check_source(self) -> None:
        """A Hub data set offline that is not in the local cache: the ConnectionError naming data.path, now."""
        if self.name is not None and hub_offline():
            self._load_hf()

    def _load_saved(self, split: str | None = None) -> datasets.Dataset:
        split = split or self.split
        ds = datasets.load_from_disk(self.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split={split!r} not in the saved DatasetDict at {self.path!r}: {list(ds)}")
            ds = ds[split]
        return ds

    def _load_hf(self, split: str | None = None) -> datasets.Dataset:
        split = split or self.split
        if self.name is not None:
            with hub_access(f"the Hub dataset name={self.name!r}", LOCAL_HINT + " (an image folder, class sub-folders "
                            "-> labels, or a datasets.Dataset.save_to_disk directory)"):
                return datasets.load_dataset(self.name, split=split, cache_dir=self.cache_dir)
        if self.classes is None:
            return self._load_saved(split)
        if split != self.split:
            raise ValueError(f"val_split={split!r}: an image folder has one split; give a saved dataset or Hub name, "
                             "or validate on a held-out val_fraction")
        return datasets.load_dataset("imagefolder", data_dir=self.path, split="train", cache_dir=self.cache_dir)

    def prepare_data(self) -> None:
        self._load_hf()  # download (Hub) or build the Arrow cache (folder) once; loaded again in setup
        if self.val_split is not None:
            self._load_hf(self.val_split)

    def load(self) -> Dataset:
        return self._images(self.split)

    def load_held_out(self) -> Dataset | None:
        return None if self.val_split is None else self._images(self.val_split)

    def _images(self, split: str) -> Dataset:
        """A split as (x, y) pairs, its labels checked, its damaged images refused (or left out)."""
        ds = self._load_hf(split)
        where = f"{self.name or self.path} (split {split!r})"
        if len(ds) == 0:
            raise ValueError(f"the dataset at {where} is empty")
        for column in (self.image_column, self.label_column):
            if column is not None and column not in ds.column_names:
                raise ValueError(f"column {column!r} not in the dataset at {where}; columns: {ds.column_names}")
        if self.classes is not None and self.classes and ds.features["label"].names != self.classes:
            raise ValueError(f"imagefolder labels {ds.features['label'].names} differ from the sub-folders "
                             f"{self.classes} of {where}")
        if self.label_column is not None:
            labels = np.asarray(ds[self.label_column])
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if len(bad):
                i = int(bad[0])
                image = ds.cast_column(self.image_column, datasets.Image(decode=False))[i][self.image_column]
                raise ValueError(f"label {labels[i]} of row {i} ({image.get('path') or 'in memory'}) in {where} is "
                                 f"outside 0..{self.num_classes - 1} (num_classes={self.num_classes})")
        images = HFImages(ds, self.image_column, self.label_column, self.image_size, self.mode)
        return self._without_damaged(images, where)

    def _without_damaged(self, images: HFImages, where: str) -> Dataset:
        rows = (r[self.image_column] for batch in images.ds.iter(batch_size=512) for r in _rows(batch))
        return without_damaged(images, rows, where, self.damaged)
