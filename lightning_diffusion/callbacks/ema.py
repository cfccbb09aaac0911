"""Exponential moving average of the weights on Lightning's WeightAveraging (EMA for validation, sampling, export)."""

import torch
from lightning.pytorch.callbacks import WeightAveraging


class EMA(WeightAveraging):
    """EMA with a half-life in optimizer steps, ramped from step 0 (Karras et al. 2022, App. F.3: ema_rampup).

    At update n the half-life is min(half_life_steps, ramp * n), so the average forgets its random start quickly;
    decay = 0.5 ** (1 / half-life). A fixed `decay` (e.g. DDPM's 0.9999) may be given instead.
    Lightning's WeightAveraging swaps the average in for validation, stores it as the checkpoint's `state_dict`
    (raw weights under `current_model_state`) and copies it into the model when training ends.
    """

    def __init__(self, half_life_steps: float | None = 500.0, ramp: float | None = 0.1, decay: float | None = None):
        if (half_life_steps is None) == (decay is None):
            raise ValueError(f"give exactly one of half_life_steps ({half_life_steps}) or decay ({decay})")
        if half_life_steps is not None and half_life_steps <= 0:
            raise ValueError(f"half_life_steps must be > 0, got {half_life_steps}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if ramp is not None and ramp <= 0:
            raise ValueError(f"ramp must be > 0 or None, got {ramp}")
        self.half_life_steps, self.ramp, self.fixed_decay = half_life_steps, ramp, decay
        super().__init__(multi_avg_fn=self._average_all, use_buffers=True)

    def decay(self, num_averaged: int) -> float:
        """The decay used for the update after `num_averaged` earlier ones."""
        if self.fixed_decay is not None:
            return self.fixed_decay
        half_life = self.half_life_steps if self.ramp is None else min(self.half_life_steps, self.ramp * num_averaged)
        return 0.5 ** (1.0 / max(half_life, 1e-8))

    def _average_all(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        """averaged <- beta averaged + (1 - beta) current, in place, one foreach kernel per device and dtype group."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay(int(num_averaged)))
        else:  # integer buffers (counters) are copied
            torch._foreach_copy_(averaged, current)

    def __repr__(self):
        return f"EMA(half_life_steps={self.half_life_steps}, ramp={self.ramp}, decay={self.fixed_decay})"

