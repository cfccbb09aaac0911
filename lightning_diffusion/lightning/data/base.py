"""The contract every shared DataModule keeps: (x, y) batches, [-1, 1] images, seeded splits, data statistics.

Caches are built in `prepare_data` (one process, no state assigned) and loaded in `setup` (every process).
Splits are a seeded permutation, so every DDP rank computes the same one; each rank's loader then takes its
shard through a DistributedSampler. Unlabeled data yields y = 0 and has num_classes = 0.
"""

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader


def to_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 in [0, 255] for saving (the inverse of `from_uint8`, up to rounding)."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: Tensor) -> Tensor:
    """Map uint8 pixels in [0, 255] to float32 in [-1, 1]."""
    return x.float() / 127.5 - 1


class FitEpochSampler(DistributedSampler):
    """This rank's shard of a permutation drawn from (seed, the fit loop's epoch) alone, the epoch read when an epoch's
    iteration starts (`trainer.current_epoch`: the epochs completed), not what `set_epoch` was last told.

    Lightning sets a resumed loader's epoch after it created the iterator (a run resumed in epoch k >= 1 replayed
    epoch 0's order), and resumed at an epoch's end it counts the epoch processed twice (2.6): the next epoch would be
    shuffled as the one after. Apart from the loader's generator and the training step's global RNG.
    """

    def __init__(self, dataset: Dataset, epoch_of, **kwargs):
        super().__init__(dataset, **kwargs)
        self.epoch_of = epoch_of

    def __iter__(self):
        self.epoch = self.epoch_of()
        return super().__iter__()


def collate_pair(batch) -> tuple[Tensor, Tensor]:
    """Collate (x, y) samples into an (x, y) tuple of batched tensors (default_collate returns a list)."""
    x, y = default_collate(batch)
    return x, y


class HFlip(Dataset):
    """Random horizontal flip (last axis) of each x, with probability 1/2, for the train split only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


class DiffusionDataModule(L.LightningDataModule):
    """Base of the shared DataModules: seeded train/val split, loaders, and the statistics models and metrics read.

    Subclasses set `shape` and `num_classes` in `__init__` (cheap, read by config validation before any compute)
    and implement `load()`, a map-style dataset of (x, y) pairs without augmentation.
    """

    shape: tuple[int, ...]
    num_classes: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 hflip: bool = False):
        super().__init__()
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r}: need an int >= 1")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers={num_workers!r}: need an int >= 0")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r}: need 0 <= val_fraction < 1")
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.hflip = val_fraction, hflip
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def load(self) -> Dataset:
        """The whole dataset as (x, y) pairs, x in the model's space, y a long scalar; called in `setup`."""
        raise NotImplementedError

    def check_source(self) -> None:
        """Raise now, before a network is built, if the data cannot be reached (the builder calls it); constructing
        a data module touches no data."""

    def load_held_out(self) -> Dataset | None:
        """A validation set of its own (another split), or None: validation holds out `val_fraction` of `load()`."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:  # Lightning calls setup once per stage
            return
        full, held_out = self.load(), self.load_held_out()
        n = len(full)
        n_val = 0 if held_out is not None else int(round(self.val_fraction * n))
        if n - n_val < 1:
            raise ValueError(f"{type(self).__name__} has {n} samples: too few for val_fraction={self.val_fraction}")
        # the same seeded permutation on every process, so DDP ranks agree on the split
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_dataset = held_out if held_out is not None else Subset(full, perm[:n_val])
        train = Subset(full, perm[n_val:])
        self._train_plain = train  # the train split without augmentation, for statistics and evaluation
        self.train_dataset = HFlip(train) if self.hflip else train

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # Stateful: Lightning checkpoints the position inside the epoch, so a resumed run sees the same batches.
        # One sampler for one process and for DDP (Lightning keeps a DistributedSampler it is given).
        trainer = self.trainer
        sampler = FitEpochSampler(dataset, (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
                                  num_replicas=trainer.world_size if trainer else 1,
                                  rank=trainer.global_rank if trainer else 0, shuffle=shuffle, seed=self.seed)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                  generator=torch.Generator().manual_seed(self.seed + 1), collate_fn=collate_pair,
                                  persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self._ensure_setup()
        return self._loader(self.val_dataset, shuffle=False) if len(self.val_dataset) else []

    def _ensure_setup(self) -> None:
        if self.train_dataset is None:
            self.prepare_data()
            self.setup("fit")

    def split_global_batch(self, world_size: int) -> None:
        """Make `batch_size` the global batch: each of the `world_size` processes loads batch_size / world_size.

        The global batch, and with it the optimisation, is then the config's whatever the device count; the learning
        rate is never rescaled implicitly (set model.optimizer.lr for the global batch you chose).
        """
        if self.batch_size % world_size:
            raise ValueError(f"data.batch_size={self.batch_size} is the global batch and must split evenly over the "
                             f"{world_size} processes (devices x num_nodes): use a multiple of {world_size}")
        self.global_batch_size, self.batch_size = self.batch_size, self.batch_size // world_size

    def encode_splits(self, encode, batch_size: int = 256) -> None:
        """Replace the train and val splits by (encode(x), y), computed once (latent diffusion's latent cache).

        Statistics and evaluation (`train_tensor`, `sample_real`) keep reading the data themselves.
        """
        if self.hflip:
            raise ValueError("a latent cache would freeze one random flip per image: use data.hflip=false, "
                             "or model.latent_cache=false to encode every batch")
        self._ensure_setup()
        self.train_dataset, self.val_dataset = (_encoded(d, encode, batch_size)
                                                for d in (self.train_dataset, self.val_dataset))

    # --- real data for evaluation and for data-dependent hyper-parameters ------------------------------

    def train_tensor(self, max_samples: int | None = None, labels: bool = False):
        """The train split (no augmentation) as one tensor, or a seeded subsample of `max_samples`; (x, y) if labels."""
        self._ensure_setup()
        n = len(self._train_plain)
        if max_samples is not None and max_samples < n:
            g = torch.Generator().manual_seed(self.seed + 1)
            idx = torch.randperm(n, generator=g)[:max_samples]
        else:
            idx = torch.arange(n)
        x, y = _gather(self._train_plain, idx)
        return (x, y) if labels else x

    def sample_real(self, n: int, seed: int | None = None) -> Tensor:
        """n distinct random train samples (no augmentation), seeded, e.g. for energy distance or a classifier."""
        self._ensure_setup()
        total = len(self._train_plain)
        if not 1 <= n <= total:
            raise ValueError(f"sample_real(n={n}): need 1 <= n <= {total}, the train-split size")
        g = torch.Generator().manual_seed(self.seed + 2 if seed is None else seed)
        return _gather(self._train_plain, torch.randperm(total, generator=g)[:n])[0]

    def statistic_sample(self, max_samples: int, encode=None) -> Tensor:
        """A seeded train subsample as float64, through `encode` (a first stage's latents) when given."""
        x = self.train_tensor(max_samples)
        if encode is not None:
            with torch.no_grad():
                x = torch.cat([encode(chunk, torch.Generator().manual_seed(i)) for i, chunk in enumerate(x.split(256))])
        return x.double()

    def data_std(self, max_samples: int = 10_000, encode=None) -> float:
        """Standard deviation of all train entries: EDM's sigma_data (Karras et al. 2022, sec. 5)."""
        return float(self.statistic_sample(max_samples, encode).std())

    def max_pairwise_distance(self, max_samples: int = 2_000, encode=None) -> float:
        """Largest distance between train samples (a subsample): NCSN's sigma_max (Song & Ermon 2020, technique 1)."""
        x = self.statistic_sample(max_samples, encode).flatten(1)
        return float(torch.cdist(x, x).max())

    @staticmethod
    def to_uint8(x: Tensor) -> Tensor:
        """Images in [-1, 1] to uint8 for saving."""
        return to_uint8(x)


@torch.no_grad()
def _encoded(dataset: Dataset, encode, batch_size: int) -> TensorDataset:
    """(encode(x), y) for every pair of `dataset`, in order, as an in-memory TensorDataset."""
    pairs = [(encode(x), y) for x, y in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pair)]
    if not pairs:
        return TensorDataset(torch.empty(0), torch.empty(0, dtype=torch.long))
    return TensorDataset(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))


def _gather(dataset: Subset, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Stack dataset[idx] into (x, y), indexing the tensors directly when the data are in memory."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        x, y = dataset.dataset.tensors
        rows = torch.as_tensor(dataset.indices)[idx]
        return x[rows], y[rows]
    pairs = [dataset[int(i)] for i in idx]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])
