"""Reference statistics: features and FID statistics of a data split, computed once per (data, split, resolution,
extractor) and cached as .npz, so `evaluate` and in-training metrics find the same numbers."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

from ..artifacts import default_cache_dir, save_npz
from .extractors import BACKEND, Extractor, extract_features


@dataclass
class ReferenceStatistics:
    """Features and FID statistics (mu, sigma) of a reference set per layer, with where they came from."""

    features: dict[str, Tensor]
    stats: dict[str, dict[str, np.ndarray]]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.features.values())))


def reference_layers(extractor: Extractor) -> list[str]:
    """The layers a reference set needs: those of FID / KID / precision-recall (IS needs no reference)."""
    return sorted({layer for metric, layer in extractor.layers.items() if metric != "isc"})


def reference_key(data: str, split: str, resolution, extractor: Extractor, max_samples: int | None = None) -> str:
    """`<data>-<split>-<H>x<W>-<extractor>-<weights hash>-<layers>[-n<max>]`: the cache file's name."""
    res = "x".join(str(int(r)) for r in resolution)
    tag = f"-n{max_samples}" if max_samples else ""
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


def data_split(datamodule, split: str, max_samples: int | None = None) -> Tensor:
    """A DataModule's train split (a seeded subsample if max_samples) or the first max_samples of its val split."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: accepted 'train' or 'val'")
    if split == "train":
        return datamodule.train_tensor(max_samples)
    datamodule.train_tensor(1)  # sets the splits up (prepare_data + setup) the way every DataModule does
    val = datamodule.val_dataset
    n = len(val) if max_samples is None else min(max_samples, len(val))
    if n == 0:
        raise ValueError(f"the val split of {type(datamodule).__name__} is empty (val_fraction=0)")
    return torch.stack([val[i][0] for i in range(n)])


def reference_statistics(extractor: Extractor, load_images, data: str, split: str, resolution, cache_dir=None,
                         max_samples: int | None = None, batch_size: int = 64,
                         progress: bool = False) -> ReferenceStatistics:
    """Reference features + FID statistics, loaded from `<cache_dir>/<reference_key>.npz` or computed and cached.

    `load_images()` returns the reference images (a tensor in [-1, 1] or uint8, or a Dataset); it is only called
    on a cache miss. The layers stored are those of FID / KID / precision-recall (IS needs no reference).
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "reference_stats"
    path = folder / f"{reference_key(data, split, resolution, extractor, max_samples)}.npz"
    layers = reference_layers(extractor)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if all(f"features_{layer}" in f for layer in layers):
                features = {layer: torch.from_numpy(f[f"features_{layer}"]) for layer in layers}
                stats = {layer: {"mu": f[f"mu_{layer}"], "sigma": f[f"sigma_{layer}"]} for layer in layers}
                return ReferenceStatistics(features, stats, json.loads(str(f["meta"])), path)
    features = extract_features(extractor, load_images(), batch_size, progress)
    stats = {layer: fid_featuresdict_to_statistics(features, layer) for layer in layers}
    meta = {"data": data, "split": split, "resolution": list(resolution), "num_samples": len(features[layers[0]]),
            "max_samples": max_samples, **extractor.record(), "backend": BACKEND} if layers else {}
    if layers:
        arrays = {}
        for layer in layers:
            arrays.update({f"features_{layer}": features[layer].numpy(), f"mu_{layer}": stats[layer]["mu"],
                           f"sigma_{layer}": stats[layer]["sigma"]})
        save_npz(path, meta=np.array(json.dumps(meta)), **arrays)
    return ReferenceStatistics({layer: features[layer] for layer in layers}, stats, meta, path if layers else None)
