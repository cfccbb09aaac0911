"""FID / IS / KID / precision-recall through torch-fidelity: extractor weights, reference statistics, the protocol.

Every number is torch-fidelity's own maths (`fid_statistics_to_metric`, `isc_featuresdict_to_metric`, ...) on the
features of an extractor from its registry: "inception-v3-compat" (the TF-1.x-compatible Inception of the original
TTUR FID: bilinear resize to 299 without antialiasing) for paper numbers, or a registered domain extractor such as
`digits-cnn` (offline). This module only chooses the inputs, caches reference features, names the results so that
a non-Inception number can never pass for FID, and writes down the protocol that travels with each number.

Paper-facing numbers go through torch-fidelity, not torchmetrics: torchmetrics' FID resizes with antialiasing by
default since 1.8, and its KID / IS take no weights path; clean-fid's clean mode differs from legacy values too.
"""

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_featuresdict_to_statistics,
                                       fid_statistics_to_metric)
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_featuresdict_to_metric)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, prepare_input_from_descriptor

from ..artifacts import save_json, save_npz
from ..data.base import to_uint8

INCEPTION = "inception-v3-compat"
BACKEND = f"torch-fidelity {torch_fidelity.__version__}"
METRICS = ("fid", "isc", "kid", "prc")  # torch-fidelity's flags: FID, Inception Score, KID, precision / recall
PAPER_NUM_SAMPLES = 50_000
# torch-fidelity's option defaults, written into every protocol (its `calculate_metrics` uses the same)
FIDELITY_OPTIONS = {"isc_splits": 10, "kid_subsets": 100, "kid_subset_size": 1000, "kid_kernel": "poly",
                    "kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1,
                    "prc_neighborhood": 3, "samples_shuffle": True, "rng_seed": 2020}
_KEYS = {KEY_METRIC_FID: "fid", KEY_METRIC_ISC_MEAN: "is_mean", KEY_METRIC_ISC_STD: "is_std",
         KEY_METRIC_KID_MEAN: "kid_mean", KEY_METRIC_KID_STD: "kid_std", KEY_METRIC_PRECISION: "precision",
         KEY_METRIC_RECALL: "recall", KEY_METRIC_F_SCORE: "f_score"}
# the same quantities in another feature space: Frechet / kernel distance and classifier score, tagged by extractor
_OTHER_KEYS = {"fid": "fd_{}", "is_mean": "cs_{}_mean", "is_std": "cs_{}_std", "kid_mean": "kd_{}_mean",
               "kid_std": "kd_{}_std", "precision": "precision_{}", "recall": "recall_{}", "f_score": "f_score_{}"}


def default_cache_dir() -> Path:
    """$LIGHTNING_DIFFUSION_CACHE, else ~/.cache/lightning_diffusion: reference statistics and domain extractors."""
    return Path(os.environ.get("LIGHTNING_DIFFUSION_CACHE", "~/.cache/lightning_diffusion")).expanduser()


def metric_names(extractor: str) -> dict[str, str]:
    """torch-fidelity's result keys -> ours: `fid`, `is_mean`, `kid_mean`, ... only for Inception; else `fd_<x>`, ...

    In any other feature space FID becomes `fd_<extractor>` (Frechet distance, as FD_DINOv2 in Stein et al. 2023),
    KID `kd_<extractor>_*` and IS `cs_<extractor>_*` (classifier score), so logs and tables cannot mix them up.
    """
    if extractor == INCEPTION:
        return dict(_KEYS)
    return {key: _OTHER_KEYS[name].format(extractor) for key, name in _KEYS.items()}


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` s (True behind an HTTPS proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def inception_cache_path() -> Path:
    """Where torch-fidelity's usual download (torch.hub) keeps the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def resolve_weights(extractor: str, weights_path=None) -> str | None:
    """The weights file an extractor will load, checked before any compute; None: torch-fidelity downloads them.

    Raises FileNotFoundError for a missing local file, for a domain extractor without weights (naming the command
    that trains them), and offline with neither a local file nor a cached download (naming both alternatives).
    """
    from . import domain  # noqa: F401  (registers `digits-cnn` with torch-fidelity)

    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature_extractor={extractor!r} is not registered with torch-fidelity; registered: "
                         f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if weights_path not in (None, ""):
        path = Path(weights_path).expanduser()
        if not path.is_file():
            command = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "TRAIN_COMMAND", None)
            raise FileNotFoundError(f"feature_extractor_weights_path={weights_path} does not exist (feature_extractor="
                                    f"{extractor!r}); give an existing weights file, or null for the default source"
                                    + (f"; train one with `{command}`" if command else ""))
        return str(path)
    train_command = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "TRAIN_COMMAND", None)
    if train_command is not None:  # a domain extractor: weights come from our own training command
        default = getattr(FEATURE_EXTRACTORS_REGISTRY[extractor], "default_weights_path")()
        if default.is_file():
            return str(default)
        raise FileNotFoundError(f"no weights for feature_extractor={extractor!r}: nothing at the default {default}. "
                                f"Train them with `{train_command}`, or set feature_extractor_weights_path=<file>")
    if extractor == INCEPTION:
        if inception_cache_path().is_file():
            return str(inception_cache_path())
        url = URL_INCEPTION_V3
    else:
        url = "https://github.com"  # torch-fidelity's other extractors download from GitHub / the hub as well
    if not url_reachable(url):
        raise FileNotFoundError(
            f"feature_extractor={extractor!r} needs its weights, but feature_extractor_weights_path is not set and "
            f"there is no network for torch-fidelity's usual download ({url} into {inception_cache_path().parent}). "
            f"Either set feature_extractor_weights_path=/path/to/{Path(urlparse(URL_INCEPTION_V3).path).name} "
            f"(downloaded on a machine with network), or run where the download works; offline on the built-in "
            f"digits, feature_extractor=digits-cnn gives a Frechet distance in a domain feature space instead")
    return None


@dataclass
class Extractor:
    """A loaded torch-fidelity feature extractor and its identity (name, weights file and hash, layer per metric)."""

    name: str
    module: FeatureExtractorBase
    layers: dict[str, str]
    weights_path: str | None
    weights_sha256: str
    device: str = "cpu"
    default_layers: bool = True

    def record(self) -> dict:
        return {"feature_extractor": self.name, "feature_extractor_weights": self.weights_path,
                "feature_extractor_weights_sha256": self.weights_sha256, "feature_layers": dict(self.layers),
                "default_feature_layers": self.default_layers}


def load_extractor(name: str = INCEPTION, weights_path=None, metrics=("fid",), device: str = "cpu",
                   layers: dict | None = None) -> Extractor:
    """Build a registered torch-fidelity extractor with the layers the metrics need (its defaults per metric).

    `layers` overrides the layer of a metric, as torch-fidelity's `feature_layer_<metric>` (e.g. {"fid": "64"}).
    """
    check_metrics(metrics)
    path = resolve_weights(name, weights_path)
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    defaults = {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}
    layers = {**defaults, **{m: str(v) for m, v in (layers or {}).items() if m in defaults}}
    provided = cls.get_provided_features_list()
    bad = {m: v for m, v in layers.items() if v not in provided}
    if bad:
        raise ValueError(f"feature layers {bad} are not provided by {name!r}; it provides {list(provided)}")
    module = create_feature_extractor(name, sorted(set(layers.values())), cuda=False, verbose=False,
                                      feature_extractor_weights_path=path)
    if path is None and name == INCEPTION and inception_cache_path().is_file():  # downloaded just now
        path = str(inception_cache_path())
    sha = sha256_file(path) if path else f"download:{name}"
    return Extractor(name, module.to(device), layers, path, sha, device, layers == defaults)


def check_metrics(metrics) -> None:
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)}: choose one or more of {list(METRICS)} (torch-fidelity's names: "
                         f"fid, isc = Inception Score, kid, prc = precision / recall)")


class _Uint8Images(Dataset):
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


def extract_features(extractor: Extractor, images, batch_size: int = 64) -> dict[str, Tensor]:
    """{layer: (N, F) features} of images in [-1, 1], uint8 RGB images, or an image folder, by torch-fidelity."""
    if isinstance(images, (str, Path)):
        dataset = image_folder(images)
    elif isinstance(images, Tensor):
        dataset = _Uint8Images(images if images.dtype == torch.uint8 else fidelity_images(images))
    else:
        dataset = images
    if len(dataset) == 0:
        raise ValueError("no images to extract features from")
    return get_featuresdict_from_dataset(dataset, extractor.module, batch_size, extractor.device.startswith("cuda"),
                                         save_cpu_ram=True, verbose=False)


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics: computed once per (data set, split, resolution, extractor), cached as .npz
# ---------------------------------------------------------------------------------------------------------------


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


def reference_statistics(extractor: Extractor, load_images, data: str, split: str, resolution,
                         cache_dir=None, max_samples: int | None = None, batch_size: int = 64) -> ReferenceStatistics:
    """Reference features + FID statistics, loaded from `<cache_dir>/<reference_key>.npz` or computed and cached.

    `load_images()` returns the reference images (a tensor in [-1, 1] or uint8, or a Dataset); it is only called
    on a cache miss. The layers stored are those of FID / KID / precision-recall (IS needs no reference).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "reference_stats"
    path = cache_dir / f"{reference_key(data, split, resolution, extractor, max_samples)}.npz"
    layers = reference_layers(extractor)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if all(f"features_{layer}" in f for layer in layers):
                features = {layer: torch.from_numpy(f[f"features_{layer}"]) for layer in layers}
                stats = {layer: {"mu": f[f"mu_{layer}"], "sigma": f[f"sigma_{layer}"]} for layer in layers}
                return ReferenceStatistics(features, stats, json.loads(str(f["meta"])), path)
    features = extract_features(extractor, load_images(), batch_size)
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


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def fidelity_metrics(extractor: Extractor, features: dict[str, Tensor], reference: ReferenceStatistics | None,
                     metrics=("fid",), **options) -> dict[str, float]:
    """torch-fidelity's FID / IS / KID / precision-recall of generated features against a reference, our names.

    `options` are torch-fidelity's (isc_splits, kid_subsets, kid_subset_size, prc_neighborhood, rng_seed, ...).
    """
    check_metrics(metrics)
    missing = [m for m in metrics if m not in extractor.layers]
    if missing:
        raise ValueError(f"metrics {missing} were not set up in the extractor (loaded for {list(extractor.layers)})")
    kwargs = {**FIDELITY_OPTIONS, **options, "verbose": False, "save_cpu_ram": False}
    n = len(next(iter(features.values())))
    if any(m != "isc" for m in metrics) and reference is None:
        raise ValueError(f"metrics {list(metrics)} compare with a reference; only isc works without one")
    if "kid" in metrics and kwargs["kid_subset_size"] > min(n, reference.num_samples):
        raise ValueError(f"kid_subset_size={kwargs['kid_subset_size']} exceeds the samples ({n}) or the reference "
                         f"({reference.num_samples}); lower fidelity.kid_subset_size or draw more samples")
    out = {}
    if "isc" in metrics:
        out.update(isc_featuresdict_to_metric(features, extractor.layers["isc"], **kwargs))
    if "fid" in metrics:
        layer = extractor.layers["fid"]
        stats = fid_featuresdict_to_statistics(features, layer)
        out.update(fid_statistics_to_metric(stats, reference.stats[layer], False))
    if "kid" in metrics:
        out.update(kid_featuresdict_to_metric(features, reference.features, extractor.layers["kid"], **kwargs))
    if "prc" in metrics:  # torch-fidelity's convention: input1 generated, input2 real
        out.update(prc_featuresdict_to_metric(features, reference.features, extractor.layers["prc"], **kwargs))
    names = metric_names(extractor.name)
    return {names[k]: float(v) for k, v in out.items()}


def summarize_seed_sets(per_seed: list[dict]) -> dict[str, float]:
    """One seed set: its metrics. Several: the mean under each name, with `<name>_min` / `<name>_max` beside it.

    EDM (Karras et al. 2022, sec. 5) reports the minimum FID over three seed sets; the mean is reported beside it.
    """
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out = {}
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed], dtype=np.float64)
        out[key] = float(values.mean())
        if not key.endswith("_std"):  # a spread within a seed set has no best seed set
            out.update({f"{key}_min": float(values.min()), f"{key}_max": float(values.max())})
    return out


def protocol_record(extractor: Extractor, num_samples: int, reference: dict, seeds, *, sampler=None, nfe=None,
                    guidance_scale=None, ema=None, proxy: bool = False, options: dict | None = None,
                    **extra) -> dict:
    """What a number means: samples, reference and split, extractor + weights hash, sampler / NFE, guidance, EMA, seeds.

    `paper_protocol` is true only for Inception's default layers, >= 50k samples and train-split statistics (DDPM,
    EDM).
    """
    paper = (extractor.name == INCEPTION and extractor.default_layers and num_samples >= PAPER_NUM_SAMPLES
             and reference.get("split") == "train" and not proxy)
    return {"backend": BACKEND, **extractor.record(), "num_samples": num_samples, "reference": reference,
            "seeds": list(seeds), "sampler": sampler, "nfe": nfe, "guidance_scale": guidance_scale, "ema": ema,
            "proxy": proxy, "paper_protocol": paper, "metric_options": {**FIDELITY_OPTIONS, **(options or {})},
            "aggregate": "mean over seed sets, *_min / *_max beside (EDM)" if len(list(seeds)) > 1 else "one seed set",
            **extra}


def save_metrics_json(path, metrics: dict, protocol: dict, **extra) -> Path:
    """{metrics, protocol, ...} written atomically: the protocol travels with every number."""
    return save_json(path, {"metrics": metrics, "protocol": protocol, **extra})


__all__ = ["BACKEND", "FIDELITY_OPTIONS", "INCEPTION", "METRICS", "Extractor", "ReferenceStatistics",
           "data_key", "data_split", "default_cache_dir", "extract_features", "fidelity_images", "fidelity_metrics", "image_folder",
           "load_extractor", "metric_names", "protocol_record", "reference_key", "reference_statistics",
           "resolve_weights", "save_metrics_json", "sha256_file", "summarize_seed_sets"]
