"""Averages of the weights: the EMA on Lightning's WeightAveraging (for validation, sampling, export), and EDM2's
post-hoc EMA, whose power-function snapshots give an EMA of any length after training (Karras et al. 2024, Sec. 3)."""

import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ...core.power_ema import SNAPSHOT_GLOB, power_ema_beta, sigma_rel_to_gamma, snapshot_name
from ..artifacts import save_torch
from ..compat import averaged_module, callback_state_key


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

    def on_fit_start(self, trainer, pl_module):
        # WeightAveraging copies the module in `setup`, before a precision plugin converts it (trainer.precision=64
        # makes the weights double): the average takes the weights' dtype, tensor by tensor
        average = averaged_module(self)
        weights = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
        for name, tensor in [*average.named_parameters(), *average.named_buffers()]:
            if name in weights:
                tensor.data = tensor.data.to(weights[name].dtype)

    def _average_all(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        """averaged <- beta averaged + (1 - beta) current, in place, one foreach kernel per device and dtype group."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay(int(num_averaged)))
        else:  # integer buffers (counters) are copied
            torch._foreach_copy_(averaged, current)

    def __repr__(self):
        return f"EMA(half_life_steps={self.half_life_steps}, ramp={self.ramp}, decay={self.fixed_decay})"


class PostHocEMA(L.Callback):
    """Tracks one power-function EMA per sigma_rel and saves each every `snapshot_every` optimizer steps (and at
    the end) to `dir` (default <run_dir>/posthoc_ema/), for `python -m lightning_diffusion.posthoc_ema` to
    synthesise an EMA of any length after training.

    Every rank tracks the same averages (DDP keeps the weights identical), so the state in a checkpoint is whole on
    any rank and resume restores it; only rank 0 writes files. The averages are kept in float32 (or the weights'
    wider dtype) on the weights' device. Works beside `EMA`: the raw training weights are averaged, never the EMA.
    """

    def __init__(self, sigma_rels=(0.05, 0.10), snapshot_every: int = 500, dir: str | None = None):
        sigma_rels = tuple(float(s) for s in sigma_rels)
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be one or more distinct values, got {sigma_rels}")
        if int(snapshot_every) != snapshot_every or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive number of optimizer steps, got {snapshot_every}")
        self.sigma_rels, self.snapshot_every, self.dir = sigma_rels, int(snapshot_every), dir
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]  # raises for a sigma_rel out of range
        self.averages: list[dict[str, torch.Tensor]] | None = None  # one state dict per profile
        self.t = 0  # optimizer steps averaged so far (the EMA's time; equals trainer.global_step)
        self.last_saved = 0

    @property
    def state_key(self) -> str:
        return callback_state_key(self, sigma_rels=self.sigma_rels)

    def snapshot_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dir) if self.dir else Path(trainer.default_root_dir) / "posthoc_ema"

    def on_train_start(self, trainer, pl_module):
        # snapshots later than the restored state belong to an abandoned trajectory (a resume from an older
        # checkpoint, or a fresh start in a used folder): set them aside so a reconstruction never mixes the two
        if not trainer.is_global_zero:
            return
        folder = self.snapshot_dir(trainer)
        stale = [p for p in folder.glob(SNAPSHOT_GLOB) if int(re.match(r"step=(\d+)", p.name)[1]) > self.t]
        if stale:
            (folder / "stale").mkdir(exist_ok=True)
            for path in stale:
                path.replace(folder / "stale" / path.name)
            rank_zero_warn(f"PostHocEMA: moved {len(stale)} snapshots later than step {self.t} to {folder}/stale/")

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = trainer.global_step
        if t <= self.t:  # no optimizer step this batch (gradient accumulation)
            return
        state = pl_module.state_dict()
        if self.averages is None:
            if self.t == 0 and t > 1:
                rank_zero_warn(f"PostHocEMA starts at step {t} without a saved state: the weights of steps "
                               f"1..{t} are taken as the current ones, so early snapshots are not true power-function EMAs")
            self.averages = [{k: v.detach().to(torch.promote_types(v.dtype, torch.float32)).clone()
                              if v.is_floating_point() else v.detach().clone() for k, v in state.items()}
                             for _ in self.gammas]
        for average, gamma in zip(self.averages, self.gammas):
            if next(iter(average.values())).device != pl_module.device:  # restored from a checkpoint onto the CPU
                average.update({k: v.to(pl_module.device) for k, v in average.items()})
            floats = [k for k, v in average.items() if v.is_floating_point()]
            # beta = (t_prev / t)^(gamma + 1): (1 - 1/t)^(gamma + 1) for one step, exact over skipped ones
            beta = power_ema_beta(t, gamma, t_prev=self.t)
            torch._foreach_lerp_([average[k] for k in floats],
                                 [state[k].to(average[k].dtype) for k in floats], 1.0 - beta)
            for name in average.keys() - set(floats):  # integer buffers (counters) follow the model
                average[name].copy_(state[name])
        self.t = t
        if t % self.snapshot_every == 0:
            self.save_snapshots(trainer)

    def on_train_end(self, trainer, pl_module):
        # the final state, unless it fell on the grid; read from the averages, so EMA's swap at train end is moot
        if self.averages is not None and self.last_saved != self.t:
            self.save_snapshots(trainer)

    def save_snapshots(self, trainer: L.Trainer) -> None:
        """Write one file per profile: {t, gamma, sigma_rel, state_dict} (atomic, rank 0)."""
        self.last_saved = self.t
        if not trainer.is_global_zero:
            return
        folder = self.snapshot_dir(trainer)
        for average, gamma, sigma_rel in zip(self.averages, self.gammas, self.sigma_rels):
            data = {"t": self.t, "gamma": gamma, "sigma_rel": sigma_rel,
                    "state_dict": {k: v.detach().cpu() for k, v in average.items()}}
            save_torch(data, folder / snapshot_name(self.t, sigma_rel))
        if self.t == self.snapshot_every:
            rank_zero_info(f"PostHocEMA: snapshots of sigma_rel={list(self.sigma_rels)} go to {folder}")

    def state_dict(self) -> dict:
        return {"t": self.t, "last_saved": self.last_saved, "gammas": self.gammas, "averages": self.averages}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["averages"] is not None and len(state_dict["gammas"]) != len(self.gammas):
            raise ValueError(f"checkpoint tracks gammas {state_dict['gammas']}, this PostHocEMA {self.gammas}")
        self.t, self.last_saved = int(state_dict["t"]), int(state_dict.get("last_saved", state_dict["t"]))
        self.averages = state_dict["averages"]

    def __repr__(self):
        return f"PostHocEMA(sigma_rels={self.sigma_rels}, snapshot_every={self.snapshot_every}, dir={self.dir})"
