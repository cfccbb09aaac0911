"""Writing run outputs atomically: image grids, sample arrays and metrics JSON (a crash never leaves half a file);
where cached artefacts live, and file hashes."""

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


FULL = (errno.ENOSPC, errno.EDQUOT)


def filesystem(path) -> str:
    """The device (and mount point) holding `path`, as /proc/self/mounts names it: the disk a user must free."""
    mount = Path(path).absolute()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:
            devices = [line.split()[0] for line in f if line.split()[1:2] == [str(mount)]]
    except OSError:  # not Linux
        devices = []
    return f"{devices[-1]} (mounted at {mount})" if devices else str(mount)


def disk_full(err: BaseException) -> bool:
    """Whether an error or one it came from is a full disk or quota (torch.save reports it as a RuntimeError
    'unexpected pos' raised from the OSError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in FULL:
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_write(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename over `path` (atomic on POSIX). A full disk is
    reported as such, naming the device and the file; the previous file at `path` is left as it was."""
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
    except Exception as err:
        if disk_full(err):
            raise OSError(errno.ENOSPC, f"no space left on {filesystem(path.parent)} writing {path} (the previous "
                          "file there is unchanged): free space on that disk or write elsewhere") from err
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch(obj, path) -> Path:
    """torch.save, atomically, through a Python file: a full disk then surfaces as the OSError it is."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], clipped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


MIN_GRID_SIDE = 256  # pixels on the short side of a saved grid: 8x8 digits are readable, not 96 px stamps


def image_grid(images: torch.Tensor, labels: torch.Tensor | None = None, nrow: int | None = None) -> torch.Tensor:
    """A (3, H, W) grid in [0, 1] of images in [-1, 1] shaped (N, C, H, W): one row per class when labels are given
    (each row in drawing order), else `nrow` (default about sqrt N) per row; upscaled by an integer factor (nearest,
    so pixels stay pixels) until the short side is at least MIN_GRID_SIDE."""
    images = images.detach().cpu()
    if labels is not None:
        labels = labels.detach().cpu()
        order = torch.argsort(labels, stable=True)
        images, nrow = images[order], int(torch.bincount(labels).max())
    grid = make_grid(to_unit_range(images), nrow=nrow or max(1, int(math.sqrt(len(images)))), padding=1, pad_value=1.0)
    factor = max(1, math.ceil(MIN_GRID_SIDE / min(grid.shape[-2:])))
    return F.interpolate(grid[None], scale_factor=factor, mode="nearest")[0]


def save_grid(images: torch.Tensor, path, labels: torch.Tensor | None = None, nrow: int | None = None) -> Path:
    """`image_grid` as a PNG (atomically); 2-D points are drawn as a scatter plot instead."""
    if images.ndim == 2:
        return save_scatter(images.detach().cpu(), path)
    grid = image_grid(images, labels, nrow)
    return atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def save_scatter(points: torch.Tensor, path) -> Path:
    """2-D samples as a scatter plot with labelled axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(points[:, 0], points[:, 1], s=2)
    ax.set(aspect="equal", xlabel="x[0]", ylabel="x[1]", title=f"{len(points)} samples")
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


def default_cache_dir() -> Path:
    """$LIGHTNING_DIFFUSION_CACHE, else ~/.cache/lightning_diffusion: reference statistics and domain extractors."""
    return Path(os.environ.get("LIGHTNING_DIFFUSION_CACHE", "~/.cache/lightning_diffusion")).expanduser()


def sha256_file(path) -> str:
    """The file's SHA-256, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
