"""Reading images, one way for every source (image folders, saved and Hub data sets, EDM zips), and the scan at
set-up that finds damaged ones before training: every image decoded, in parallel, with progress.

A truncated, zero-byte or foreign file, or a PNG whose zlib stream is corrupt under valid chunk CRCs, would otherwise
surface only when its batch comes up, possibly hours into a run. PIL's `verify` checks chunks and CRCs only; the
scan decodes every pixel (`Image.load`), as training will.
"""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..progress import progress_bar
from .base import from_uint8

CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # 8-bit PIL modes and their channel counts


def read_image(source, mode: str, size: int, fit) -> torch.Tensor:
    """One image (a path, or a file object) as (C, size, size) in [-1, 1], decoded in full.

    8-bit images go through PIL's conversion to `mode`. Greyscale of more than 8 bits (PIL modes I;16* and I: 16-bit
    PNGs) is read at its own depth, as floats in [0, 1] (PIL mode F), not clipped to 255, which made it white; its grey
    goes to every channel of an RGB mode. `fit(image, size)` brings a PIL image of another size to size x size.
    """
    with Image.open(source) as im:
        im.load()
        deep = im.mode.startswith("I")
        if deep and mode not in ("L", "RGB"):
            raise ValueError(f"a {im.mode} (more than 8 bits) image can be read as mode L or RGB, not {mode!r}")
        if deep:
            levels = 65535.0 if im.mode.startswith("I;16") or int(np.asarray(im).max(initial=0)) <= 65535 else 2.0**32 - 1
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / levels).astype(np.float32), mode="F")
        else:
            im = im.convert(mode)
    if im.size != (size, size):
        im = fit(im, size)
    if not deep:
        return from_uint8(TF.pil_to_tensor(im))
    grey = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())[None]
    return (2 * grey - 1).clamp(-1, 1).expand(CHANNELS[mode], -1, -1).contiguous()


def image_fault(image: dict) -> str | None:
    """Why a {bytes, path} image (or {read, path}: `read()` gives its bytes) cannot be decoded, or None if it can."""
    try:
        source = (io.BytesIO(image["read"]()) if "read" in image else io.BytesIO(image["bytes"]) if image.get("bytes")
                  else image["path"])
        with Image.open(source) as im:
            im.load()
    except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, zlib errors, ...: any fault counts)
        return f"{type(err).__name__}: {err}"
    return None


def _checked(item: tuple[int, dict]) -> tuple[int, str, str | None]:
    i, image = item
    return i, image.get("path") or f"row {i}", image_fault(image)


def damaged_images(rows, total: int, where: str, workers: int = 8, progress: bool = True) -> list[tuple[int, str, str]]:
    """(row, its file or 'row i', the fault) of every unreadable image among `rows` (`image_fault`'s dicts, in order)."""
    found = []
    with ThreadPoolExecutor(workers) as pool, progress_bar(total, f"checking the images of {where}", progress,
                                                           "image") as bar:
        for i, name, fault in pool.map(_checked, enumerate(rows), chunksize=64):
            bar.update(1)
            if fault is not None:
                found.append((i, name, fault))
    return found


def without_damaged(images: Dataset, rows, where: str, damaged: str) -> Dataset:
    """`images`, checked at set-up: `damaged="error"` refuses it naming every unreadable image, `"skip"` leaves them
    out and says how many. `rows` are the images' `image_fault` dicts, in the data set's order."""
    bad = damaged_images(rows, len(images), where)
    if not bad:
        return images
    listed = "; ".join(f"{name}: {fault}" for _, name, fault in bad[:20]) + (
        f"; ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
    if damaged == "error":
        raise ValueError(f"{len(bad)} of {len(images)} images of {where} cannot be read: {listed}. Replace them, "
                         "or set data.damaged=skip to leave them out")
    rank_zero_warn(f"left out {len(bad)} of {len(images)} images of {where} that cannot be read "
                   f"(data.damaged=skip): {listed}")
    bad_rows = {i for i, _, _ in bad}
    return Subset(images, [i for i in range(len(images)) if i not in bad_rows])
