"""Splitting sample generation (or any per-sample evaluation) across DDP ranks, reproducibly, and gathering it back.

The n samples are cut into chunks of `batch_size`; chunk k is drawn with its own generator seeded from
(seed, k) and is done by rank k mod world_size. So the samples depend on (seed, n, batch_size) only, never on
the number of processes, and gathering by sample index checks that none is lost or duplicated.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def chunk_seed(seed: int, chunk: int) -> int:
    """A seed for chunk `chunk` of seed set `seed`, distinct across both (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shard_rounds(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int] | None]:
    """This rank's chunk in each round, (chunk index, start, stop), or None when it has none in the last round.

    Chunk k goes to rank k mod world_size, in round k // world_size; every rank has the same number of rounds, so a
    collective between rounds (a stop point) pairs on all of them.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside 0..{world_size - 1}")
    chunks = math.ceil(n / batch_size)
    return [(k, k * batch_size, min(n, (k + 1) * batch_size)) if k < chunks else None
            for k in range(rank, math.ceil(chunks / world_size) * world_size, world_size)]


def shard_capacity(n: int, batch_size: int, world_size: int) -> int:
    """Rows every rank pads its shard to before an all_gather (all ranks must send the same shape)."""
    return math.ceil(math.ceil(n / batch_size) / world_size) * batch_size


def class_labels(n: int, num_classes: int, device=None) -> Tensor | None:
    """Labels 0, 1, ..., C-1, 0, ... for n samples (as `sample`, the grids and the final samples use), None if
    unconditional."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


@torch.no_grad()
def generate_shard(model, n: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1,
                   sampler: Callable | None = None, grid: Callable | None = None, guidance_scale: float | None = None,
                   on_samples: Callable[[int], None] | None = None,
                   between_rounds: Callable[[], None] | None = None,
                   on_call: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor, int]:
    """This rank's share of n samples of seed set `seed`: (sample indices, samples on the CPU, NFE per sample).

    `on_samples(k)` hears of every k samples done, `on_call(nfe)` of every network evaluation (progress bars);
    `between_rounds()` is called after every round on every rank alike (a stop point).
    """
    labels = class_labels(n, model.num_classes)
    index, chunks, nfe = [], [], 0
    for chunk in shard_rounds(n, batch_size, rank, world_size):
        if chunk is not None:
            k, start, stop = chunk
            generator = torch.Generator().manual_seed(chunk_seed(seed, k))
            chunk_labels = labels[start:stop].to(model.device) if labels is not None else None
            x, nfe = model.generate(stop - start, chunk_labels, guidance_scale, sampler, grid, generator,
                                    on_call=on_call)
            index.append(torch.arange(start, stop))
            chunks.append(x.cpu())
            if on_samples is not None:
                on_samples(stop - start)
        if between_rounds is not None:
            between_rounds()
    if not chunks:  # more ranks than chunks
        return torch.empty(0, dtype=torch.long), torch.empty(0, *model.sample_shape), nfe
    return torch.cat(index), torch.cat(chunks), nfe


def map_shard(fn: Callable[[Tensor, torch.Generator], Tensor], x: Tensor, seed: int, batch_size: int, rank: int = 0,
              world_size: int = 1, on_samples: Callable[[int], None] | None = None,
              between_rounds: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
    """This rank's share of fn(x[chunk], generator of (seed, chunk)) -> (indices, per-sample values), e.g. bits/dim."""
    index, values = [], []
    for chunk in shard_rounds(len(x), batch_size, rank, world_size):
        if chunk is not None:
            k, start, stop = chunk
            values.append(fn(x[start:stop], torch.Generator().manual_seed(chunk_seed(seed, k))).detach().cpu())
            index.append(torch.arange(start, stop))
            if on_samples is not None:
                on_samples(stop - start)
        if between_rounds is not None:
            between_rounds()
    if not values:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
    return torch.cat(index), torch.cat(values)


def gather_shards(index: Tensor, values: Tensor, all_gather: Callable[[Tensor], Tensor] | None, n: int,
                  batch_size: int, world_size: int) -> Tensor:
    """All ranks' (index, values) -> values for samples 0..n-1 in order; raises if any is lost or duplicated.

    `all_gather` is Fabric's or a LightningModule's (tensor -> (world_size, *shape)); None on one process.
    """
    if world_size > 1:
        capacity = shard_capacity(n, batch_size, world_size)
        pad = capacity - len(index)
        index = torch.cat([index, torch.full((pad,), -1, dtype=torch.long)])
        values = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
        index, values = all_gather(index).flatten(), all_gather(values).flatten(0, 1)
        index, values = index.cpu(), values.cpu()
        keep = index >= 0
        index, values = index[keep], values[keep]
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(n)):
        raise RuntimeError(f"gathered {len(index)} samples with indices that are not 0..{n - 1} exactly once: "
                           f"the ranks disagree on n={n}, batch_size={batch_size} or world_size={world_size}")
    return values[order]
