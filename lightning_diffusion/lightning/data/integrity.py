"""Damaged images found at set-up, before training: every file opened and checked, in parallel, with progress.

A truncated, zero-byte or foreign file would otherwise surface only when its batch comes up, possibly hours into a
run. Each image's header is parsed and its data checked (PIL's `verify`: for PNG every chunk through IEND, CRCs
included) without decoding it.
"""

import io
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..progress import progress_bar


def image_fault(image: dict) -> str | None:
    """Why a {bytes, path} image cannot be read, or None if it can."""
    try:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, struct errors, ...: any fault counts)
        return f"{type(err).__name__}: {err}"
    return None


def _checked(item: tuple[int, dict]) -> tuple[int, str, str | None]:
    i, image = item
    return i, image.get("path") or f"row {i}", image_fault(image)


def damaged_images(rows, total: int, where: str, workers: int = 8, progress: bool = True) -> list[tuple[int, str, str]]:
    """(row, its file or 'row i', the fault) of every unreadable image among `rows` ({bytes, path} dicts, in order)."""
    found = []
    with ThreadPoolExecutor(workers) as pool, progress_bar(total, f"checking the images of {where}", progress,
                                                           "image") as bar:
        for i, name, fault in pool.map(_checked, enumerate(rows), chunksize=64):
            bar.update(1)
            if fault is not None:
                found.append((i, name, fault))
    return found
