"""Reference statistics: FID's (mu, sigma) of a data split, and the features KID / precision-recall compare with,
computed once per (data, split, resolution, extractor) and cached as .npz, so `evaluate` and in-training metrics
find the same numbers.

The images are streamed: a lazy view of the split (`split_images`) goes through torch-fidelity's extractor batch by
batch, and FID's mean and covariance are accumulated in float64 (batch means and centred sums of outer products,
merged as Chan et al. 1979), so memory does not grow with the reference set. KID and precision-recall need the
reference features themselves, by definition: they are kept only for those metrics' layers, optionally a seeded
subsample of `max_features` of them.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..artifacts import default_cache_dir, save_npz
from .extractors import BACKEND, Extractor, as_dataset, iter_features
from .images import fidelity_images

FEATURE_METRICS = ("kid", "prc")  # the metrics that compare with the reference's features, not its statistics


@dataclass
class ReferenceStatistics:
    """FID statistics (mu, sigma) per layer and, for KID / precision-recall, features, with where they came from."""

    features: dict[str, Tensor]
    stats: dict[str, dict[str, np.ndarray]]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_samples(self) -> int:
        if "num_samples" in self.meta:
            return self.meta["num_samples"]
        return len(next(iter(self.features.values())))


def reference_layers(extractor: Extractor) -> list[str]:
    """The layers a reference set needs: those of FID / KID / precision-recall (IS needs no reference)."""
    return sorted({layer for metric, layer in extractor.layers.items() if metric != "isc"})


def feature_layers(extractor: Extractor) -> list[str]:
    """The layers whose reference features are kept: KID's and precision-recall's."""
    return sorted({layer for metric, layer in extractor.layers.items() if metric in FEATURE_METRICS})


def reference_key(data: str, split: str, resolution, extractor: Extractor, max_samples: int | None = None,
                  max_features: int | None = None) -> str:
    """`<data>-<split>-<H>x<W>-<extractor>-<weights hash>-<layers>[-n<max>][-f<max features>]`: the cache's name."""
    res = "x".join(str(int(r)) for r in resolution)
    tag = f"-n{max_samples}" if max_samples else ""
    tag += f"-f{max_features}" if max_features and feature_layers(extractor) else ""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in data)
    layers = "+".join(reference_layers(extractor)) or "none"
    return f"{safe}-{split}-{res}-{extractor.name}-{extractor.weights_sha256.split(':')[-1][:12]}-{layers}{tag}"


def data_key(data_cfg) -> str:
    """A readable, collision-free name for a data config: `<name>-<hash of the keys that select the images>`."""
    cfg = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    base = cfg.get("name") or (Path(cfg["path"]).name if cfg.get("path") else None)
    base = base or cfg["_target_"].rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    selecting = {k: v for k, v in cfg.items() if k not in ("batch_size", "num_workers", "hflip", "cache_dir")}
    return f"{base}-{hashlib.sha256(json.dumps(selecting, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def split_indices(datamodule, split: str, max_samples: int | None) -> tuple[Dataset, list[int]]:
    """(the split's plain dataset, the positions in it that `data_split` takes: a seeded train subsample, the first
    max_samples of val), after setting the data module up."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: accepted 'train' or 'val'")
    datamodule.train_tensor(1)  # sets the splits up (prepare_data + setup) the way every DataModule does
    if split == "train":
        plain = datamodule._train_plain  # the train split without augmentation (DiffusionDataModule.setup)
        n = len(plain)
        if max_samples is not None and max_samples < n:  # the subsample DiffusionDataModule.train_tensor draws
            return plain, torch.randperm(n, generator=torch.Generator().manual_seed(datamodule.seed + 1))[
                :max_samples].tolist()
        return plain, list(range(n))
    val = datamodule.val_dataset
    n = len(val) if max_samples is None else min(max_samples, len(val))
    if n == 0:
        raise ValueError(f"the val split of {type(datamodule).__name__} is empty (val_fraction=0)")
    return val, list(range(n))


def data_split(datamodule, split: str, max_samples: int | None = None) -> Tensor:
    """A DataModule's train split (a seeded subsample if max_samples) or the first max_samples of its val split, as
    one tensor (for the few samples a likelihood needs; reference statistics stream `split_images` instead)."""
    if split == "train":
        return datamodule.train_tensor(max_samples)
    dataset, idx = split_indices(datamodule, split, max_samples)
    return torch.stack([dataset[i][0] for i in idx])


class FidelityView(Dataset):
    """The x of (x, y) pairs, decoded on access, as torch-fidelity reads images: uint8 RGB (3, H, W)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        return fidelity_images(self.dataset[i][0][None])[0]


def split_images(datamodule, split: str, max_samples: int | None = None) -> Dataset:
    """The images of `data_split`, as a lazy Dataset that torch-fidelity reads batch by batch (nothing stacked).

    On-disk latents (a data module with `images`) give the images they were encoded from.
    """
    datamodule = getattr(datamodule, "images", datamodule)
    dataset, idx = split_indices(datamodule, split, max_samples)
    return FidelityView(Subset(dataset, idx))


class StreamedMoments:
    """Mean and covariance of rows added batch by batch, in float64: Chan et al.'s merge of (count, mean, centred M2)."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        self.dtype = torch.float32

    def add(self, rows: Tensor) -> None:
        self.dtype, rows = rows.dtype, rows.to(torch.float64)
        nb, mean_b = len(rows), rows.mean(0)
        centred = rows - mean_b
        delta, total = mean_b - self.mean, self.n + nb
        self.m2 += centred.T @ centred + torch.outer(delta, delta) * (self.n * nb / total)
        self.mean += delta * (nb / total)
        self.n = total

    def statistics(self) -> dict[str, np.ndarray]:
        """{mu, sigma} as torch-fidelity's `fid_features_to_statistics`: mu in the features' dtype (its FID compares
        dtypes), sigma float64 as np.cov's, normalised by n - 1."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 reference images, got {self.n}")
        return {"mu": self.mean.to(self.dtype).numpy(), "sigma": (self.m2 / (self.n - 1)).numpy()}


def kept_rows(n: int, max_features: int | None) -> Tensor | None:
    """A boolean mask of the rows whose features are kept (a seeded subsample of max_features), None for all."""
    if max_features is None or max_features >= n:
        return None
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_features]] = True
    return mask


def stream_statistics(extractor: Extractor, images, batch_size: int = 64, progress: bool = False,
                      max_features: int | None = None) -> tuple[dict, dict[str, Tensor], int]:
    """(stats per reference layer, kept features per KID / PRC layer, number of images) in one pass over the images."""
    layers, keep = reference_layers(extractor), feature_layers(extractor)
    dataset = as_dataset(images)
    mask = kept_rows(len(dataset), max_features)
    moments, kept, seen = {}, {layer: [] for layer in keep}, 0
    for batch in iter_features(extractor, dataset, batch_size, progress):
        b = len(batch[layers[0]])
        for layer in layers:
            moments.setdefault(layer, StreamedMoments(batch[layer].shape[1])).add(batch[layer])
        for layer in keep:  # KID / PRC: the features themselves (a seeded subsample of max_features)
            kept[layer].append(batch[layer] if mask is None else batch[layer][mask[seen: seen + b]])
        seen += b
    features = {layer: torch.cat(chunks) for layer, chunks in kept.items()}
    return {layer: m.statistics() for layer, m in moments.items()}, features, seen


def _cached(path: Path, layers: list[str], keep: list[str]) -> ReferenceStatistics | None:
    """The cache file's statistics, if it holds every layer's (mu, sigma) and the features that are kept."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        if not all(f"mu_{layer}" in f for layer in layers) or not all(f"features_{layer}" in f for layer in keep):
            return None
        features = {layer: torch.from_numpy(f[f"features_{layer}"]) for layer in keep}
        stats = {layer: {"mu": f[f"mu_{layer}"], "sigma": f[f"sigma_{layer}"]} for layer in layers}
        return ReferenceStatistics(features, stats, json.loads(str(f["meta"])), path)


def reference_statistics(extractor: Extractor, load_images, data: str, split: str, resolution, cache_dir=None,
                         max_samples: int | None = None, batch_size: int = 64, progress: bool = False,
                         max_features: int | None = None) -> ReferenceStatistics:
    """Reference FID statistics (+ KID / PRC features), loaded from `<cache_dir>/<reference_key>.npz` or streamed and
    cached.

    `load_images()` returns the reference images (a lazy Dataset such as `split_images`, a tensor in [-1, 1] or uint8,
    or an image folder's data set); it is only called on a cache miss.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "reference_stats"
    path = folder / f"{reference_key(data, split, resolution, extractor, max_samples, max_features)}.npz"
    layers, keep = reference_layers(extractor), feature_layers(extractor)
    if not layers:
        return ReferenceStatistics({}, {}, {}, None)
    cached = _cached(path, layers, keep)
    if cached is not None:
        return cached
    stats, features, n = stream_statistics(extractor, load_images(), batch_size, progress, max_features)
    meta = {"data": data, "split": split, "resolution": list(resolution), "num_samples": n, "max_samples": max_samples,
            "max_features": max_features, "feature_layers": keep, **extractor.record(), "backend": BACKEND,
            "accumulation": "streamed float64 (Chan et al.)"}
    arrays = {f"features_{layer}": features[layer].numpy() for layer in keep}
    for layer in layers:
        arrays.update({f"mu_{layer}": stats[layer]["mu"], f"sigma_{layer}": stats[layer]["sigma"]})
    save_npz(path, meta=np.array(json.dumps(meta)), **arrays)
    return ReferenceStatistics(features, stats, meta, path)
