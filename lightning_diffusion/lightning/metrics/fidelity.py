"""FID / IS / KID / precision-recall through torch-fidelity: extractor weights, reference statistics, the protocol.

Every number is torch-fidelity's own maths (`fid_statistics_to_metric`, `isc_featuresdict_to_metric`, ...) on the
features of an extractor from its registry: "inception-v3-compat" (the TF-1.x-compatible Inception of the original
TTUR FID: bilinear resize to 299 without antialiasing) for paper numbers, or a registered domain extractor such as
`digits-cnn` (offline). This module only chooses the inputs, caches reference features, names the results so that
a non-Inception number can never pass for FID, and writes down the protocol that travels with each number.

Paper-facing numbers go through torch-fidelity, not torchmetrics: torchmetrics' FID resizes with antialiasing by
default since 1.8, and its KID / IS take no weights path; clean-fid's clean mode differs from legacy values too.
"""

from pathlib import Path

import numpy as np
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_featuresdict_to_metric)

from ..artifacts import save_json
from .extractors import BACKEND, INCEPTION, Extractor, check_metrics
from .reference import ReferenceStatistics

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


def metric_names(extractor: str) -> dict[str, str]:
    """torch-fidelity's result keys -> ours: `fid`, `is_mean`, `kid_mean`, ... only for Inception; else `fd_<x>`, ...

    In any other feature space FID becomes `fd_<extractor>` (Frechet distance, as FD_DINOv2 in Stein et al. 2023),
    KID `kd_<extractor>_*` and IS `cs_<extractor>_*` (classifier score), so logs and tables cannot mix them up.
    """
    if extractor == INCEPTION:
        return dict(_KEYS)
    return {key: _OTHER_KEYS[name].format(extractor) for key, name in _KEYS.items()}


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
