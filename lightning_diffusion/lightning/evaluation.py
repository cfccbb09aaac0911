"""Scoring a checkpoint, an image folder, or nothing (reference statistics only), each number with its protocol.

FID / IS / KID / precision-recall by torch-fidelity against cached reference statistics, and test-set bits/dim
(PF-ODE for continuous-time models, the VLB for DDPM). Under Fabric DDP the ranks draw disjoint seeded chunks and
rank 0 gathers them and computes the metrics once; the samples depend on (seed, n, batch_size) only.
"""

import hashlib
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset
from torch_fidelity.registry import DATASETS_REGISTRY
from torch_fidelity.utils import prepare_input_from_descriptor

from .artifacts import save_npz, sha256_file
from .checkpoints import find_run_config, load_model, read_checkpoint
from .metrics.bits_per_dim import LikelihoodOptions, likelihood_metrics
from .metrics.extractors import METRICS, extract_features, load_extractor, resolve_weights
from .metrics.fidelity import fidelity_metrics, protocol_record, save_metrics_json, summarize_seed_sets
from .metrics.images import fidelity_images, image_folder
from .metrics.reference import data_key, data_split, reference_statistics
from .metrics.sharding import gather_shards, generate_shard, shard_rounds
from .progress import sampling_bar
from .sampling import output_stem, sampler_label, sampling_choice, use_transforms

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
    for key in ("num_samples", "batch_size"):
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"{key}={cfg[key]!r}: need an int >= 1 (num_samples is 50000 in the papers' protocol)")
    if not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds={cfg.seeds}: need a non-empty list of distinct ints (one per seed set)")
    if cfg.reference.split not in SPLITS:
        raise ValueError(f"reference.split={cfg.reference.split!r}: accepted {list(SPLITS)}")
    source = cfg.reference.source
    if source and source not in DATASETS_REGISTRY and not Path(source).is_dir():
        raise ValueError(f"reference.source={source!r} is neither a torch-fidelity data set "
                         f"({sorted(DATASETS_REGISTRY)}) nor an image folder; null uses the data config")
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


def fidelity_options(cfg: DictConfig, num_samples: int, reference_samples: int) -> dict:
    """torch-fidelity's options of the config, KID's subset size at most the samples and the reference (warned).

    KID (Binkowski et al. 2018) averages an unbiased MMD^2 over random subsets; a subset of all n < kid_subset_size
    samples is the same estimator with more variance, so a small evaluation clamps the subset instead of failing.
    The size used is what the protocol records. Without KID in `metrics` the option is left as it is.
    """
    options = OmegaConf.to_container(cfg.fidelity, resolve=True)
    size = min(num_samples, reference_samples)
    if "kid" in cfg.metrics and options["kid_subset_size"] > size:
        logging.getLogger(__name__).warning(
            f"fidelity.kid_subset_size={options['kid_subset_size']} > {num_samples} samples / {reference_samples} "
            f"reference images: KID uses subsets of {size} (recorded in the protocol's metric_options)")
        options["kid_subset_size"] = size
    return options


def checkpoint_has_ema(ckpt_path) -> bool:
    """Whether the checkpoint's weights are an EMA (Lightning's WeightAveraging keeps the raw ones beside them)."""
    return "current_model_state" in read_checkpoint(ckpt_path, mmap=True)


def log_to_loggers(cfg: DictConfig, run_dir, metrics: dict, protocol: dict) -> None:
    """Send the metrics (under eval/) and the protocol (as hyper-parameters) to the configured loggers."""
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        logger = instantiate(logger_cfg, save_dir=str(run_dir))
        logger.log_hyperparams({"evaluation_protocol": protocol})
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        logger.finalize("success")


class Evaluation:
    """One evaluation's shared state: the Fabric ranks, the model (if any), the extractor and reference (rank 0)."""

    def __init__(self, cfg: DictConfig, fabric: L.Fabric):
        self.cfg, self.fabric = cfg, fabric
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.all_gather = fabric.all_gather if self.world > 1 else None
        self.model = self.run_cfg = None
        if cfg.ckpt_path:
            self.model, self.run_cfg = load_model(cfg.ckpt_path, device=str(fabric.device))
        data_cfg = cfg.get("data") or (self.run_cfg.data if self.run_cfg is not None else None)
        name, split, resolution, load_images = reference_source(cfg, data_cfg)
        self.extractor = self.reference = None
        if self.rank == 0:
            self.extractor = load_extractor(cfg.feature_extractor, cfg.feature_extractor_weights_path,
                                            tuple(cfg.metrics), str(fabric.device), cfg.get("feature_layers"))
            self.reference = reference_statistics(self.extractor, load_images, name, split, resolution, cfg.cache_dir,
                                                  cfg.reference.max_samples, cfg.feature_batch_size, cfg.progress)
        self.ref_record = {"data": name, "split": split, "resolution": list(resolution),
                           "num_samples": self.reference.num_samples if self.reference else None,
                           "statistics": str(self.reference.path) if self.reference and self.reference.path else None}
        self.options = OmegaConf.to_container(cfg.fidelity, resolve=True)
        if self.reference is not None and (cfg.ckpt_path or cfg.images):
            n = cfg.num_samples if cfg.ckpt_path else len(image_folder(cfg.images))
            self.options = fidelity_options(cfg, n, self.reference.num_samples)

    def score(self, images) -> dict:
        """torch-fidelity's metrics of images (uint8 tensor, folder data set) against the reference (rank 0)."""
        features = extract_features(self.extractor, images, self.cfg.feature_batch_size, self.cfg.progress)
        return fidelity_metrics(self.extractor, features, self.reference, tuple(self.cfg.metrics), **self.options)

    def finish(self, out: Path, run_dir, metrics: dict, protocol: dict, **extra) -> dict:
        """Write the JSON, log it, print it (rank 0): {metrics, protocol, path}."""
        path = save_metrics_json(out, metrics, protocol, **extra)
        log_to_loggers(self.cfg, run_dir, metrics, protocol)
        print(f"wrote {path}: " + ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
        return {"metrics": metrics, "protocol": protocol, "path": str(path)}


def evaluate_reference(ev: Evaluation) -> dict:
    """Neither a checkpoint nor images: the reference statistics are computed and cached (a job for a cluster node)."""
    if ev.rank == 0:
        print(f"reference statistics: {ev.ref_record['statistics']} ({ev.ref_record['num_samples']} images)")
    return {"reference": ev.ref_record}


def evaluate_images(ev: Evaluation) -> dict:
    """A folder of images against the reference (rank 0 alone)."""
    cfg = ev.cfg
    if ev.rank != 0:
        return {}
    folder = image_folder(cfg.images)
    out_dir = Path(cfg.out_dir or cfg.images)
    protocol = protocol_record(ev.extractor, len(folder), ev.ref_record, [], images=str(Path(cfg.images).resolve()),
                               options=ev.options)
    return ev.finish(out_dir / f"evaluation-{ev.extractor.name}.json", out_dir, ev.score(folder), protocol)


def evaluate_checkpoint(ev: Evaluation) -> dict:
    """Samples of a checkpoint per seed set, scored, with test-set bits/dim when asked for."""
    cfg, model, run_cfg = ev.cfg, ev.model, ev.run_cfg
    run_dir = find_run_config(cfg.ckpt_path).parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "evaluation"
    sampler_cfg, grid_cfg = sampling_choice(cfg, run_cfg)
    sampler, grid = instantiate(sampler_cfg), instantiate(grid_cfg)
    transforms = {"transforms": use_transforms(model, cfg, run_cfg)}
    transforms = transforms if transforms["transforms"] else {}  # none: the names and records of before
    per_seed, nfe = [], None
    batches = sum(chunk is not None for chunk in shard_rounds(cfg.num_samples, cfg.batch_size, ev.rank, ev.world))
    for seed in cfg.seeds:
        with sampling_bar(model, batches, f"sampling {cfg.num_samples}, seed set {seed}", cfg.progress, sampler,
                          grid) as bar:
            index, x, nfe = generate_shard(model, cfg.num_samples, seed, cfg.batch_size, ev.rank, ev.world, sampler,
                                           grid, cfg.guidance_scale, on_call=lambda _: bar.update())
        # uint8 RGB is all the extractors read: 4x less to gather than float32
        images = gather_shards(index, fidelity_images(x), ev.all_gather, cfg.num_samples, cfg.batch_size, ev.world)
        if ev.rank == 0:
            per_seed.append(ev.score(images))
            if cfg.save_samples:
                stem = output_stem(sampler_cfg, grid_cfg, nfe, n=cfg.num_samples, seed=seed, **transforms)
                save_npz(out_dir / f"{stem}.npz", samples=images)
    likelihood, likelihood_protocol = {}, None
    if cfg.likelihood.enabled:
        options = LikelihoodOptions(**{k: v for k, v in cfg.likelihood.items() if k != "enabled"})
        x_test = data_split(instantiate(cfg.get("data") or run_cfg.data), options.split, options.num_samples)
        likelihood, likelihood_protocol = likelihood_metrics(model, x_test, options, ev.rank, ev.world,
                                                             ev.all_gather, cfg.progress)
    if ev.rank != 0:
        return {}
    guidance = model.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    protocol = protocol_record(
        ev.extractor, cfg.num_samples, ev.ref_record, cfg.seeds, sampler=OmegaConf.to_container(sampler_cfg),
        grid=OmegaConf.to_container(grid_cfg), sampler_label=sampler_label(sampler_cfg, grid_cfg), nfe=nfe,
        guidance_scale=guidance if model.num_classes else None,
        ema=checkpoint_has_ema(cfg.ckpt_path), options=ev.options, checkpoint=str(Path(cfg.ckpt_path).resolve()),
        checkpoint_sha256=sha256_file(cfg.ckpt_path), labels="0..C-1 cycled" if model.num_classes else None,
        batch_size=cfg.batch_size, world_size=ev.world, chunk_seeding="chunk k of seed s: SeedSequence([s, k])",
        likelihood=likelihood_protocol, **transforms)
    stem = output_stem(sampler_cfg, grid_cfg, nfe, n=cfg.num_samples, extractor=ev.extractor.name,
                       guidance_scale=guidance, seeds=list(cfg.seeds), likelihood=likelihood_protocol, **transforms)
    return ev.finish(out_dir / f"{stem}.json", run_dir, {**summarize_seed_sets(per_seed), **likelihood}, protocol,
                     per_seed=dict(zip(map(str, cfg.seeds), per_seed)))


def evaluate(cfg: DictConfig) -> dict:
    """Metrics and protocol (and the JSON path) on every rank; rank 0 computes, writes and logs them."""
    check_config(cfg)
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                      num_nodes=cfg.num_nodes)
    fabric.launch()
    ev = Evaluation(cfg, fabric)
    mode = evaluate_checkpoint if cfg.ckpt_path else evaluate_images if cfg.images else evaluate_reference
    return fabric.broadcast(mode(ev), src=0)
