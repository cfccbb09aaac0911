"""Gradient checkpointing of a network's chosen blocks: a switch for the big networks (ADM, the deep NCSN++ / DDPM++).

The network's parameters and state-dict keys stay as they are, so checkpoints, EMA copies and converted weights work
the same with the switch on or off.
"""

import types
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The class's forward, its activations recomputed in backward instead of stored (when gradients are on)."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(network: nn.Module, block_classes: Sequence[str]) -> int:
    """Gradient checkpointing (Chen et al. 2016) of every submodule whose class is named in `block_classes`.

    A block then keeps only its inputs for backward and runs its forward again there: activation memory falls to
    about one block's, for one more forward pass per step. Dropout draws the same masks in the recomputation (the RNG
    state is replayed). Returns the number of blocks; a name that matches none is a ValueError naming the classes
    the network has.
    """
    names = set(block_classes)
    blocks = [m for m in network.modules() if type(m).__name__ in names]
    missing = names - {type(m).__name__ for m in blocks}
    if missing:
        present = sorted({type(m).__name__ for m in network.modules()})
        raise ValueError(f"gradient_checkpointing={sorted(names)}: {type(network).__name__} has no module of class "
                         f"{sorted(missing)}; its classes are {present}")
    for block in blocks:
        # bound to the block itself: a deep copy (the EMA's) binds the copy, not this block
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)

