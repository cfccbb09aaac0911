"""Latents encoded once to disk and read back like a data set (EDM2's `encode` idea, Karras et al. 2024): the moments
[mu, log sigma^2] of q(z | x) per image, so each training step draws a fresh z from them.

`encode_latents` cuts the whole data set (in `load()` order, before the train / val split) into shards of
`shard_size` images; shard k is encoded by rank k mod world_size and written atomically as
<out>/shard-<k>.pt, so every image is encoded once, and a killed encode resumes from the shards it finished.
<out>/plan.json (written first) holds what the shards are of: a resume with another data set, first stage or
shard size is refused. <out>/manifest.json (written last) marks the encode complete; `LatentDataModule` reads it.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .artifacts import atomic_write, save_torch
from .data.base import DiffusionDataModule, collate_pair

PLAN, MANIFEST = "plan.json", "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.pt"


def probe_image(shape) -> Tensor:
    """A fixed image, a ramp over [-1, 1], whose moments fingerprint an autoencoder."""
    return torch.linspace(-1, 1, math.prod(shape)).reshape(1, *shape)


def fingerprint(moments: Tensor) -> list[float]:
    """Per-channel means and the first 16 values of the probe image's moments."""
    moments = moments.detach().cpu().double()
    return moments.mean((0, 2, 3)).tolist() + moments.flatten()[:16].tolist()


def same_fingerprint(a, b) -> bool:
    """Equal up to device arithmetic (TF32 convolutions differ from the CPU's by ~1e-3); another autoencoder by O(1)."""
    return len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-2, atol=1e-3)


def make_plan(datamodule, first_stage, n: int, shard_size: int, flips: bool, dtype: str, data_cfg, stage_cfg) -> dict:
    """What the shards hold (compared on resume): the data and first-stage configs, sizes, shapes, a fingerprint.

    The first stage's normalisation (scale, shift) is left out: the moments are the raw latents', before it.
    """
    device = next(first_stage.parameters()).device
    probe = fingerprint(first_stage.moments(probe_image(datamodule.shape).to(device)))
    return {"data": _plain(data_cfg, drop=("batch_size", "num_workers")),
            "first_stage": _plain(stage_cfg, drop=("scale", "shift")),
            "num_images": n, "shard_size": shard_size, "num_shards": math.ceil(n / shard_size), "flips": flips,
            "dtype": dtype, "data_shape": list(datamodule.shape), "latent_shape": list(first_stage.latent_shape),
            "num_classes": datamodule.num_classes, "probe": probe}


def _plain(cfg, drop=()):
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    return {k: v for k, v in cfg.items() if k not in drop} if isinstance(cfg, dict) else cfg


def write_json(path: Path, record: dict) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def agree_on_plan(out: Path, plan: dict, rank: int, barrier: Callable[[], None]) -> None:
    """Rank 0 writes plan.json (or finds the same one); every rank then checks it is the plan it would write."""
    if rank == 0 and not (out / PLAN).is_file():
        write_json(out / PLAN, plan)
    barrier()
    found = json.loads((out / PLAN).read_text())
    differ = sorted(k for k in plan if k != "probe" and found.get(k) != plan[k])
    if differ or not same_fingerprint(found["probe"], plan["probe"]):
        raise ValueError(f"{out} holds latents of another encode ({', '.join(differ) or 'another autoencoder'} "
                         f"differ: {({k: found.get(k) for k in differ if k != 'data'})}); give a new out_dir, or "
                         "delete that one to start over")


@torch.no_grad()
def encode_shard(first_stage, dataset: Dataset, start: int, stop: int, batch_size: int, num_workers: int,
                 flips: bool, dtype: torch.dtype) -> dict:
    """{index, moments, labels[, moments_flipped]} of images start..stop-1, on the first stage's device."""
    device = next(first_stage.parameters()).device
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_pair)
    moments, flipped, labels = [], [], []
    for x, y in loader:
        x = x.to(device)
        moments.append(first_stage.moments(x).cpu().to(dtype))
        if flips:
            flipped.append(first_stage.moments(x.flip(-1)).cpu().to(dtype))
        labels.append(y)
    shard = {"index": torch.arange(start, stop), "moments": torch.cat(moments), "labels": torch.cat(labels)}
    return {**shard, "moments_flipped": torch.cat(flipped)} if flips else shard


def encode_latents(datamodule: DiffusionDataModule, first_stage, out_dir, data_cfg=None, stage_cfg=None,
                   shard_size: int = 4096, batch_size: int = 64, flips: bool = False, dtype: str = "float32",
                   rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                   gather: Callable[[Tensor], Tensor] | None = None,
                   on_shard: Callable[[int], None] | None = None) -> dict:
    """Encode this rank's missing shards; the manifest (written by rank 0 once all exist) is returned on every rank.

    `gather` (Fabric's all_gather) collects each rank's count of images encoded into the manifest; `on_shard(k)` hears
    of every shard written (a progress report; a test's kill).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: accepted {sorted(DTYPES)}")
    first_stage.check_data(datamodule.shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = datamodule.load()
    n = len(dataset)
    plan = make_plan(datamodule, first_stage, n, shard_size, flips, dtype, data_cfg, stage_cfg)
    agree_on_plan(out, plan, rank, barrier)
    encoded = 0
    for k in range(rank, plan["num_shards"], world_size):
        path = shard_path(out, k)
        for stale in out.glob(f".{path.name}.*"):  # the temporary file of a write that was killed
            stale.unlink(missing_ok=True)
        if path.is_file():  # finished before: written whole or not at all
            continue
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        shard = encode_shard(first_stage, dataset, start, stop, batch_size, datamodule.num_workers, flips, DTYPES[dtype])
        save_torch(shard, path)
        encoded += stop - start
        if on_shard is not None:
            on_shard(k)
    counts = gather(torch.tensor([encoded])).flatten().tolist() if gather is not None else [encoded]
    barrier()
    if rank == 0:
        missing = [k for k in range(plan["num_shards"]) if not shard_path(out, k).is_file()]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {out} are missing after every rank finished")
        write_json(out / MANIFEST, {**plan, "encoded_per_rank": counts})
    barrier()
    return json.loads((out / MANIFEST).read_text())


class LatentShards(Dataset):
    """(moments, y) per image from the shards, memory-mapped: a random draw touches one image's pages, not a shard.

    With `hflip` each draw takes the moments of the mirrored image with probability 1/2 (encoded beside them).
    """

    def __init__(self, out: Path, num_images: int, shard_size: int, hflip: bool):
        self.out, self.num_images, self.shard_size, self.hflip = out, num_images, shard_size, hflip
        self._shards: dict[int, dict] = {}

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}  # each worker maps the files itself

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        k, row = divmod(int(i), self.shard_size)
        if k not in self._shards:
            self._shards[k] = torch.load(shard_path(self.out, k), map_location="cpu", mmap=True, weights_only=True)
        shard = self._shards[k]
        key = "moments_flipped" if self.hflip and torch.rand(()) < 0.5 else "moments"
        return shard[key][row].float(), shard["labels"][row]


class LatentDataModule(DiffusionDataModule):
    """The latents `encode_latents` wrote, as (moments, y) pairs: train with `model.latent_cache=true` (each step draws
    z ~ q(z | x) from the moments) and the same first stage (it decodes the samples; checked by its fingerprint).

    `shape` is the images' (what the first stage is checked against); the seeded train / val split is the images'
    own (seed and val_fraction null: those of the images' data config), so `images` (the data module they were
    encoded from) gives statistics and evaluation the real images of the same split.
    """

    def __init__(self, path: str, image_size: int | None = None, batch_size: int = 128, num_workers: int = 0,
                 seed: int | None = None, val_fraction: float | None = None, hflip: bool = False):
        self.out = Path(path)
        if not (self.out / MANIFEST).is_file():
            state = "an unfinished encode: run it again, it resumes" if (self.out / PLAN).is_file() else \
                "no encode: `python -m lightning_diffusion.encode_latents data=... first_stage=... out_dir=...`"
            raise FileNotFoundError(f"data.path={path} has no {MANIFEST} ({state})")
        self.manifest = json.loads((self.out / MANIFEST).read_text())
        if hflip and not self.manifest["flips"]:
            raise ValueError(f"hflip=true, but {path} was encoded without mirrored images: encode with flips=true "
                             "into a new out_dir, or hflip=false")
        images = self.manifest["data"] or {}  # seed / val_fraction null: the images' own split, image for image
        seed = images.get("seed", 0) if seed is None else seed
        val_fraction = images.get("val_fraction", 0.1) if val_fraction is None else val_fraction
        super().__init__(batch_size, num_workers, seed, val_fraction, hflip=False)
        self.flips = hflip  # the base class's HFlip would mirror the moments, not encode the mirrored image
        self.shape, self.num_classes = tuple(self.manifest["data_shape"]), self.manifest["num_classes"]
        if image_size not in (None, self.shape[-1]):
            raise ValueError(f"data.image_size={image_size}, but {path} holds latents of {self.shape[-1]}-pixel "
                             f"images: set data.image_size={self.shape[-1]} (or null)")
        self.image_size = self.shape[-1]
        self._images = None

    def load(self, mirrored: bool = False) -> LatentShards:
        return LatentShards(self.out, self.manifest["num_images"], self.manifest["shard_size"], mirrored)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        super().setup(stage)
        if self.flips:  # the train split draws mirrored images half the time; validation stays unmirrored
            self.train_dataset = Subset(self.load(mirrored=True), self._train_plain.indices)

    @property
    def images(self) -> DiffusionDataModule:
        """The image data module the latents were encoded from, with this module's split (seed, val_fraction)."""
        if self._images is None:
            from hydra.utils import instantiate

            cfg = {**self.manifest["data"], "seed": self.seed, "val_fraction": self.val_fraction}
            self._images = instantiate(cfg)
        return self._images

    def encode_splits(self, encode, batch_size: int = 256) -> None:
        """Called by a model with latent_cache=true at fit start: nothing to encode; checks the first stage instead."""
        if not same_fingerprint(fingerprint(encode(probe_image(self.shape))), self.manifest["probe"]):
            raise ValueError(f"the model's first stage is not the autoencoder that encoded {self.out} (their moments "
                             f"of a probe image differ): use the first stage of its {PLAN}")

    @staticmethod
    def check_training(latent_cache: bool) -> None:
        """On-disk latents are moments, which only a model with latent_cache=true reads as such."""
        if not latent_cache:
            raise ValueError("data=latents yields the moments of q(z | x), not images: set model.latent_cache=true "
                             "(each step then draws z from them)")

    def train_tensor(self, max_samples: int | None = None, labels: bool = False):
        return self.images.train_tensor(max_samples, labels)

    def sample_real(self, n: int, seed: int | None = None) -> Tensor:
        return self.images.sample_real(n, seed)
