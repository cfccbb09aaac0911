"""Drawing samples from a trained model outside training: the device, the batches, progress, and a file name that
says what drew them (`sample` and `evaluate` name their outputs with the same helper)."""

import hashlib
import json
import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .metrics.sharding import class_labels
from .progress import sampling_bar


def best_device(device: str = "auto") -> str:
    """`auto`: the first GPU when there is one (CUDA, else Apple's MPS), else the CPU; any other value as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def sampling_choice(cfg: DictConfig, run_cfg: DictConfig) -> tuple[DictConfig, DictConfig]:
    """The (sampler, grid) configs to draw with: `sampler=<name>` with its grid, else the run's own; a grid given
    alone (`grid=<name>`) replaces the run's, and grid keys alone (`grid.steps=10`) update it."""
    sampler = cfg.sampler if cfg.get("sampler") else run_cfg.sampler
    grid = cfg.get("grid") or {}
    if cfg.get("sampler") or "_target_" in grid:
        return sampler, OmegaConf.merge(run_cfg.grid if "_target_" not in grid else {}, grid)
    return sampler, OmegaConf.merge(run_cfg.grid, grid)


def use_transforms(model, cfg: DictConfig, run_cfg: DictConfig) -> list:
    """Set the denoiser transforms `model` samples with: `transforms=[...]` as given (`[]`: none), else the run's.

    Returns their configs (the record that names the output files and enters the protocol; [] when none)."""
    chosen = cfg.get("transforms")
    if chosen is None:
        chosen = run_cfg.get("transforms") or []
    if not isinstance(chosen, (list, ListConfig)):
        raise ValueError(f"transforms={chosen!r} must be a list of denoiser transforms, e.g. "
                         "[{_target_: lightning_diffusion.core.transforms.clip_x0, _partial_: true}], or [] for none")
    model.transforms = [instantiate(t) for t in chosen]
    return [_plain(t) for t in chosen]


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def sampler_label(sampler_cfg, grid_cfg) -> str:
    """`<sampler>-<grid>`, e.g. `heun-karras`, `ancestral-strided`, `unipc-order2-bh1-logsnr`: the solver names a
    PF-ODE sampler, with its order and variant where it has them."""
    sampler, grid = _plain(sampler_cfg), _plain(grid_cfg)
    if isinstance(sampler.get("solver"), dict):
        sampler = sampler["solver"]
    parts = [sampler["_target_"].rsplit(".", 1)[-1]]
    parts += [f"order{sampler['order']}"] if "order" in sampler else []
    parts += [str(sampler["variant"])] if "variant" in sampler else []
    return "-".join([*parts, grid["_target_"].rsplit(".", 1)[-1].removesuffix("_times")])


def output_stem(sampler_cfg, grid_cfg, nfe: int, **setting) -> str:
    """`<sampler>-<grid>-nfe<N>-<key><value>...-<hash>`: the hash covers the whole sampler and grid configs and the
    setting, so results of different configurations never share a file name (and equal ones do)."""
    record = {"sampler": _plain(sampler_cfg), "grid": _plain(grid_cfg), **setting}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]
    shown = "".join(f"-{key}{value}" for key, value in setting.items() if key in ("n", "seed"))
    return f"{sampler_label(sampler_cfg, grid_cfg)}-nfe{nfe}{shown}-{digest}"


@torch.no_grad()
def draw(model, n: int, batch_size: int, seed: int, sampler=None, grid=None, guidance_scale: float | None = None,
         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """n samples in batches from one generator seeded with `seed`, labels 0..C-1 cycled: (samples, labels, NFE)."""
    generator = torch.Generator().manual_seed(seed)
    labels = class_labels(n, model.num_classes, model.device)
    chunks, nfe = [], 0
    with sampling_bar(model, math.ceil(n / batch_size), f"sampling {n}", progress, sampler, grid) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            chunk_labels = labels[start:stop] if labels is not None else None
            x, nfe = model.generate(stop - start, chunk_labels, guidance_scale, sampler, grid, generator,
                                    on_call=lambda _: bar.update())
            chunks.append(x.cpu())
    return torch.cat(chunks), labels, nfe
