"""Score a checkpoint or an image folder: `python -m lightning_diffusion.evaluate ckpt_path=... [sampler=...] [n...]`.

FID / IS / KID / precision-recall by torch-fidelity (`metrics.fidelity`) against cached reference statistics, and
test-set bits/dim (PF-ODE for continuous-time models, the VLB for DDPM), written as one JSON that carries its
protocol, and sent to the loggers (W&B, CSV). With `devices` > 1, Fabric launches DDP (gloo on the CPU): the ranks
draw disjoint seeded chunks, rank 0 gathers them and computes the metrics once. Neither `ckpt_path` nor `images`:
only the reference statistics are computed and cached (a job for a cluster node).
`devices` > 1 is for the command line: Lightning re-launches the command once per extra rank.
"""

import hashlib
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Subset
from torch_fidelity.registry import DATASETS_REGISTRY
from torch_fidelity.utils import prepare_input_from_descriptor

from .artifacts import save_npz
from .checkpoints import find_run_config, load_model
from .metrics.fidelity import (METRICS, data_key, data_split, extract_features, fidelity_images, fidelity_metrics,
                               image_folder, load_extractor, protocol_record, reference_statistics, resolve_weights,
                               save_metrics_json, sha256_file, summarize_seed_sets)
from .metrics.likelihood import likelihood_metrics
from .metrics.sharding import gather_shards, generate_shard
from .tracking import register_resolvers

register_resolvers()

SPLITS = ("train", "val")
# image size of torch-fidelity's registered data sets, so a cached key is found without the data on disk
REGISTERED_RESOLUTION = {"cifar10": (32, 32), "cifar100": (32, 32), "stl10": (96, 96)}


def check_config(cfg: DictConfig) -> None:
    """Every ValueError / FileNotFoundError a config can cause, raised before any compute."""
    if cfg.ckpt_path and cfg.images:
        raise ValueError(f"ckpt_path={cfg.ckpt_path} and images={cfg.images}: give one (or neither, to precompute "
                         f"the reference statistics)")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
    if cfg.images and not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"images={cfg.images} is not a folder (PNG / JPG images to score)")
    if not cfg.ckpt_path and not cfg.get("data") and not cfg.reference.source:
        raise ValueError("no reference data: without ckpt_path give data=<name> (e.g. data=digits) or "
                         "reference.source=<torch-fidelity data set name or image folder>")
    bad = [m for m in cfg.metrics if m not in METRICS]
    if bad or not cfg.metrics:
        raise ValueError(f"metrics={list(cfg.metrics)}: choose from {list(METRICS)}")
    if not (isinstance(cfg.num_samples, int) and cfg.num_samples >= 1):
        raise ValueError(f"num_samples={cfg.num_samples!r}: need an int >= 1 (50000 in the papers' protocol)")
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ValueError(f"batch_size={cfg.batch_size!r}: need an int >= 1")
    if not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds={cfg.seeds}: need a non-empty list of distinct ints (one per seed set)")
    if cfg.reference.split not in SPLITS:
        raise ValueError(f"reference.split={cfg.reference.split!r}: accepted {list(SPLITS)}")
    source = cfg.reference.source
    if source and source not in DATASETS_REGISTRY and not Path(source).is_dir():
        raise ValueError(f"reference.source={source!r} is neither a torch-fidelity data set "
                         f"({sorted(DATASETS_REGISTRY)}) nor an image folder; null uses the data config")
    if "kid" in cfg.metrics and cfg.ckpt_path and cfg.fidelity.kid_subset_size > cfg.num_samples:
        raise ValueError(f"fidelity.kid_subset_size={cfg.fidelity.kid_subset_size} > num_samples={cfg.num_samples}; "
                         f"lower it or draw more samples")
    if cfg.likelihood.enabled:
        if not cfg.ckpt_path:
            raise ValueError("likelihood.enabled=true needs a checkpoint (ckpt_path=...)")
        if cfg.likelihood.split not in SPLITS:
            raise ValueError(f"likelihood.split={cfg.likelihood.split!r}: accepted {list(SPLITS)}")
    resolve_weights(cfg.feature_extractor, cfg.feature_extractor_weights_path)


def reference_source(cfg: DictConfig, data_cfg):
    """(name, split, resolution, load_images) of the reference set the config asks for."""
    source, split, max_samples = cfg.reference.source, cfg.reference.split, cfg.reference.max_samples
    if source is None:
        datamodule = instantiate(data_cfg)
        if len(datamodule.shape) != 3:
            raise ValueError(f"{type(datamodule).__name__} has shape {datamodule.shape}: image metrics need images")
        return data_key(data_cfg), split, datamodule.shape[1:], lambda: data_split(datamodule, split, max_samples)

    def load_dataset():
        if source in DATASETS_REGISTRY:
            dataset = prepare_input_from_descriptor({"input": source}, datasets_root=cfg.reference.datasets_root,
                                                    datasets_download=True)
        else:
            dataset = image_folder(source)
        return Subset(dataset, range(min(max_samples, len(dataset)))) if max_samples else dataset

    if source in DATASETS_REGISTRY:  # e.g. cifar10-train: the split is part of the name
        family, registered_split = source.rsplit("-", 1)
        resolution = REGISTERED_RESOLUTION.get(family) or tuple(load_dataset()[0].shape[1:])
        return source, registered_split, resolution, load_dataset
    first = image_folder(source)[0]
    name = f"{Path(source).name}-{hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]}"
    return name, split, tuple(first.shape[1:]), load_dataset


def sampler_record(cfg: DictConfig, run_cfg) -> tuple[dict, str]:
    """The sampler's config (the chosen one, or the model's default) and a short name for file names."""
    sampler_cfg = cfg.sampler if cfg.get("sampler") else run_cfg.model.sampler
    record = OmegaConf.to_container(sampler_cfg, resolve=True)
    inner = record.get("sampler", {})
    name = inner.get("_target_", record["_target_"]).rsplit(".", 1)[-1]
    if isinstance(inner.get("solver"), dict):
        name = inner["solver"]["_target_"].rsplit(".", 1)[-1]
    return record, name


def checkpoint_has_ema(ckpt_path) -> bool:
    """Whether the checkpoint's weights are an EMA (Lightning's WeightAveraging keeps the raw ones beside them)."""
    return "current_model_state" in torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)


def log_to_loggers(cfg: DictConfig, metrics: dict, protocol: dict) -> None:
    """Send the metrics (under eval/) and the protocol (as hyper-parameters) to the configured loggers."""
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        logger = instantiate(logger_cfg)
        logger.log_hyperparams({"evaluation_protocol": protocol})
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        logger.finalize("success")


def evaluate(cfg: DictConfig) -> dict:
    """Metrics and protocol (and the JSON path) on every rank; rank 0 computes, writes and logs them."""
    check_config(cfg)
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                      num_nodes=cfg.num_nodes)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    all_gather = fabric.all_gather if world > 1 else None
    model = run_cfg = None
    if cfg.ckpt_path:
        model, run_cfg = load_model(cfg.ckpt_path, device=str(fabric.device))
    data_cfg = cfg.get("data") or (run_cfg.data if run_cfg is not None else None)
    name, split, resolution, load_images = reference_source(cfg, data_cfg)
    cache_dir = cfg.cache_dir
    extractor = reference = None
    if rank == 0:
        extractor = load_extractor(cfg.feature_extractor, cfg.feature_extractor_weights_path, tuple(cfg.metrics),
                                   layers=cfg.get("feature_layers"))
        reference = reference_statistics(extractor, load_images, name, split, resolution, cache_dir,
                                         cfg.reference.max_samples, cfg.feature_batch_size)
    ref_record = {"data": name, "split": split, "resolution": list(resolution),
                  "num_samples": reference.num_samples if reference else None,
                  "statistics": str(reference.path) if reference and reference.path else None}
    options = OmegaConf.to_container(cfg.fidelity, resolve=True)

    if not cfg.ckpt_path and not cfg.images:  # reference statistics only
        result = {"reference": ref_record}
        if rank == 0:
            print(f"reference statistics: {ref_record['statistics']} ({ref_record['num_samples']} images)")
        return fabric.broadcast(result, src=0)

    if cfg.images:
        out_dir = Path(cfg.out_dir or cfg.images)
        result = {}
        if rank == 0:
            folder = image_folder(cfg.images)
            metrics = fidelity_metrics(extractor, extract_features(extractor, folder, cfg.feature_batch_size),
                                       reference, tuple(cfg.metrics), **options)
            protocol = protocol_record(extractor, len(folder), ref_record, [], images=str(Path(cfg.images).resolve()),
                                       options=options)
            path = save_metrics_json(out_dir / f"evaluation-{extractor.name}.json", metrics, protocol)
            result = {"metrics": metrics, "protocol": protocol, "path": str(path)}
            with open_dict(cfg):
                cfg.run_dir = str(out_dir)
            log_to_loggers(cfg, metrics, protocol)
        return fabric.broadcast(result, src=0)

    run_dir = find_run_config(cfg.ckpt_path).parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "evaluation"
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else model.sampler
    sampler_cfg, sampler_name = sampler_record(cfg, run_cfg)
    per_seed, nfe = [], None
    for seed in cfg.seeds:
        index, x, nfe = generate_shard(model, cfg.num_samples, seed, cfg.batch_size, rank, world, sampler,
                                       cfg.guidance_scale)
        # uint8 RGB is all the extractors read: 4x less to gather than float32
        images = gather_shards(index, fidelity_images(x), all_gather, cfg.num_samples, cfg.batch_size, world)
        if rank == 0:
            per_seed.append(fidelity_metrics(extractor, extract_features(extractor, images, cfg.feature_batch_size),
                                             reference, tuple(cfg.metrics), **options))
            if cfg.save_samples:
                save_npz(out_dir / f"{sampler_name}-nfe{nfe}-n{cfg.num_samples}-seed{seed}.npz", samples=images)
    likelihood, likelihood_protocol = {}, None
    if cfg.likelihood.enabled:
        test_data = cfg.get("data") or run_cfg.data
        x_test = data_split(instantiate(test_data), cfg.likelihood.split, cfg.likelihood.num_samples)
        likelihood, likelihood_protocol = likelihood_metrics(model, x_test, cfg, rank, world, all_gather)
    result = {}
    if rank == 0:
        metrics = {**summarize_seed_sets(per_seed), **likelihood}
        guidance = model.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
        protocol = protocol_record(
            extractor, cfg.num_samples, ref_record, cfg.seeds, sampler=sampler_cfg, nfe=nfe,
            guidance_scale=guidance if model.num_classes else None, ema=checkpoint_has_ema(cfg.ckpt_path),
            options=options, checkpoint=str(Path(cfg.ckpt_path).resolve()),
            checkpoint_sha256=sha256_file(cfg.ckpt_path), labels="0..C-1 cycled" if model.num_classes else None,
            batch_size=cfg.batch_size, world_size=world, chunk_seeding="chunk k of seed s: SeedSequence([s, k])",
            likelihood=likelihood_protocol)
        stem = f"{sampler_name}-nfe{nfe}-n{cfg.num_samples}-{extractor.name}"
        path = save_metrics_json(out_dir / f"{stem}.json", metrics, protocol,
                                 per_seed=dict(zip(map(str, cfg.seeds), per_seed)))
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        log_to_loggers(cfg, metrics, protocol)
        print(f"wrote {path}: " + ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
        result = {"metrics": metrics, "protocol": protocol, "path": str(path)}
    return fabric.broadcast(result, src=0)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
