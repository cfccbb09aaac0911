"""Optimisation pieces the LightningModules share."""

import torch


def with_linear_warmup(optimizer: torch.optim.Optimizer, steps: int):
    """Lightning's configure_optimizers answer: the learning rate ramped linearly over the first `steps` steps."""
    if not steps:
        return optimizer
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
