"""Writing run outputs atomically: image grids, sample arrays and metrics JSON (a crash never leaves half a file)."""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image


def atomic_write(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], clipped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> Path:
    """A PNG grid of images in [-1, 1] shaped (N, C, H, W); 2-D points are drawn as a scatter plot instead."""
    images = images.detach().cpu()
    if images.ndim == 2:
        return save_scatter(images, path)
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    return atomic_write(path, lambda tmp: save_image(to_unit_range(images), tmp, nrow=nrow, padding=1, format="png"))


def save_scatter(points: torch.Tensor, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(points[:, 0], points[:, 1], s=2)
    ax.set_aspect("equal")
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def save_npz(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v.detach().cpu().numpy() if torch.is_tensor(v) else v for k, v in arrays.items()})

    return atomic_write(path, write)


def save_json(path, data: dict) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)

    return atomic_write(path, write)
