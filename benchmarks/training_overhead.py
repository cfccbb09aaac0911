"""Training throughput: our LightningModule + Trainer against a hand-written loop doing the same math, and diffusers.

    python benchmarks/training_overhead.py [--quick]            # the throughput tables
    python benchmarks/training_overhead.py --profile [--quick]  # where our overhead goes

Variants (same data loader, batch, Adam, gradient clipping, warm-up, EMA, label dropout):
  ours          DiffusionModel (DDPM or EDM) under a Lightning Trainer with the default callbacks minus the
                sampling ones (EMA on), CSV logger, no progress bar, no validation.
  hand          the same U-Net (`network=unet_tiny`, same init) in a minimal PyTorch loop: eps-loss (DDPM) or
                EDM's preconditioned loss, Adam, clip_grad_norm_, LambdaLR warm-up, EMA with torch._foreach_lerp_.
  diffusers     diffusers' UNet2DModel (a different network of similar size) + DDPMScheduler.add_noise in the same
                minimal loop: its images/s are reported on their own line, not as a ratio to ours.
--profile instead times the pieces of our DDPM step inside the fit (wrapped hooks, callbacks, logger, network
forward), next to the hand loop in the same run, then the suspects in isolation: where the overhead goes.
Steps are timed between consecutive on_train_batch_end calls (median over steps, then over interleaved
rounds), so set-up is excluded.
"""

import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from _common import arguments, compose, header, interleaved, median, table, timed
from lightning_diffusion.lightning.builder import build


class StepTimer(L.Callback):
    """perf_counter at the end of every training batch."""

    def __init__(self):
        self.stamps = []

    def on_train_batch_end(self, *args, **kwargs):
        self.stamps.append(time.perf_counter())


def step_time(stamps: list[float], warmup: int) -> float:
    """Median seconds per step after `warmup` steps."""
    return median([b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1:])])


def overrides(family: str, steps: int, extra=()) -> list[str]:
    return [f"model={family}", "network=unet_tiny", "data=digits", "logger=csv", f"trainer.max_steps={steps}",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0",
            "~callbacks.sample_grid", "~callbacks.final_samples", *extra]


def run_ours(family: str, steps: int, warmup: int, extra=(), patch=None) -> float:
    """Seconds per training step of our DiffusionModel under the Trainer."""
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        cfg = compose(overrides(family, steps, extra), run_dir)
        datamodule, model, trainer = build(cfg)
        if patch:
            patch(model)
        timer = StepTimer()
        trainer.callbacks.append(timer)
        trainer.fit(model, datamodule=datamodule)
        return step_time(timer.stamps, warmup)


class Stopwatch:
    """Accumulates the seconds spent in wrapped callables, per bucket, from step `warmup` on."""

    def __init__(self):
        self.total, self.calls, self.on = {}, {}, False

    def wrap(self, bucket: str, fn):
        self.total.setdefault(bucket, 0.0)  # listed even when not called in the timed steps (e.g. gated logging)

        def timed_fn(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.total[bucket] = self.total.get(bucket, 0.0) + time.perf_counter() - start
                    self.calls[bucket] = self.calls.get(bucket, 0) + 1
        return timed_fn


def profiled_ours(family: str, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per step of each piece of our training step, timed inside one fit by wrapping the pieces."""
    watch = Stopwatch()

    def instrument(model):
        model.log = watch.wrap("self.log calls, all (nested: part of training_step)", model.log)
        model.log_dict = watch.wrap("per-bin logging: its self.log_dict call (nested)", model.log_dict)
        model.bins.sums_and_counts = watch.wrap("per-bin logging: sums and counts (nested)", model.bins.sums_and_counts)
        model.draw_noise_levels = watch.wrap("noise-level draw (nested)", model.draw_noise_levels)
        model.training_step = watch.wrap("training_step (forward: loss + logging)", model.training_step)
        model.backward = watch.wrap("backward", model.backward)
        model.on_before_optimizer_step = watch.wrap("gradient finiteness check", model.on_before_optimizer_step)
        network, start = model.denoiser.network, {}

        def before(*args):
            start["t"] = time.perf_counter()

        def after(*args):
            if watch.on:
                key = "network forward (nested)"
                watch.total[key] = watch.total.get(key, 0.0) + time.perf_counter() - start["t"]

        network.register_forward_pre_hook(before)
        network.register_forward_hook(after)

    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        datamodule, model, trainer = build(compose(overrides(family, steps), run_dir))
        instrument(model)
        for callback in trainer.callbacks:
            for hook in ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_before_backward",
                         "on_after_backward", "on_before_zero_grad"):
                if getattr(type(callback), hook) is not getattr(L.Callback, hook):  # overridden: time it
                    setattr(callback, hook, watch.wrap(f"callback {type(callback).__name__}", getattr(callback, hook)))
        for logger in trainer.loggers:
            logger.log_metrics = watch.wrap("logger.log_metrics", logger.log_metrics)
        timer = StepTimer()

        class Switch(L.Callback):  # start the stopwatch after the warm-up steps
            def on_train_batch_start(self, trainer, *args):
                watch.on = trainer.global_step >= warmup

        trainer.callbacks = [Switch(), *trainer.callbacks, timer]
        trainer.fit(model, datamodule=datamodule)
    n = steps - warmup
    out = {k: v / n for k, v in watch.total.items()}
    out["step"] = (timer.stamps[-1] - timer.stamps[warmup - 1]) / n
    nested = ("training_step", "backward", "gradient", "callback", "logger")
    out["rest: Lightning loop, optimizer + clipping, data, scheduler"] = out["step"] - sum(
        v for k, v in out.items() if k.startswith(nested))
    return out


def batches(datamodule):
    """The train loader, forever."""
    while True:
        yield from datamodule.train_dataloader()


class HandLoop:
    """A minimal training loop; `loss(net, x0, labels)` is the only thing that differs between variants."""

    def __init__(self, net, loss, num_classes: int, lr: float = 1e-3, warmup: int = 100, half_life: float = 500.0,
                 ramp: float = 0.1, label_dropout: float = 0.1, clip: float = 1.0, datamodule=None):
        self.net, self.loss, self.num_classes = net, loss, num_classes
        self.params = list(net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self.ema = [p.detach().clone() for p in self.params]
        self.half_life, self.ramp, self.label_dropout, self.clip = half_life, ramp, label_dropout, clip
        self.data, self.n = batches(datamodule), 0

    def step(self):
        x0, y = next(self.data)
        y = torch.where(torch.rand(y.shape) < self.label_dropout, torch.full_like(y, self.num_classes), y)
        loss = self.loss(self.net, x0, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        # EMA with the half-life ramped from step 0, as lightning_diffusion.lightning.callbacks.EMA
        decay = 0.5 ** (1.0 / max(min(self.half_life, self.ramp * self.n), 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.n += 1

    def run(self, steps: int, warmup: int) -> float:
        stamps = []
        for _ in range(steps):
            self.step()
            stamps.append(time.perf_counter())
        return step_time(stamps, warmup)


def ddpm_loss(T: int = 1000):
    """Ho et al.'s L_simple with t ~ U{1..T}; the network sees c_noise = -logsnr / 8, as our Denoiser feeds it."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    sqrt_ab, sqrt_1m = abar.sqrt().float(), (1 - abar).sqrt().float()
    c_noise = (-(abar / (1 - abar)).log() / 8).float()

    def loss(net, x0, y):
        t = torch.randint(1, T + 1, (x0.shape[0],))
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m[t].view(-1, 1, 1, 1) * eps
        return F.mse_loss(net(x_t, c_noise[t], y), eps)

    return loss


def edm_loss(P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
    """EDM's preconditioned, weighted loss with ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""

    def loss(net, x0, y):
        sigma = (P_mean + P_std * torch.randn(x0.shape[0])).exp()
        s = sigma.view(-1, 1, 1, 1)
        x = x0 + s * torch.randn_like(x0)
        norm = (s**2 + sigma_data**2).sqrt()
        D = (sigma_data**2 / norm**2) * x + (s * sigma_data / norm) * net(x / norm, sigma.log() / 4, y)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return (weight * ((D - x0) ** 2).flatten(1).mean(1)).mean()

    return loss


def diffusers_unet():
    """diffusers' UNet2DModel sized like unet_tiny: 32/64 channels, 1 block per level, attention at 4x4, 11 classes."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=64, norm_num_groups=32, num_class_embeds=11)


def diffusers_loss():
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000)

    def loss(net, x0, y):
        t = torch.randint(0, 1000, (x0.shape[0],))
        eps = torch.randn_like(x0)
        return F.mse_loss(net(sched.add_noise(x0, eps, t), t, class_labels=y).sample, eps)

    return loss


def hand_loop(family: str, datamodule, net_cfg) -> HandLoop:
    torch.manual_seed(0)
    net = instantiate(net_cfg)
    return HandLoop(net, ddpm_loss() if family == "ddpm" else edm_loss(), datamodule.num_classes, datamodule=datamodule)


class PassThrough(torch.nn.Module):
    """Stands in for the network: returns its input, so only the loss's own arithmetic is timed."""

    def __init__(self):
        super().__init__()
        self.dtype_carrier = torch.nn.Parameter(torch.zeros(()))  # the Denoiser reads the network's dtype from it

    def forward(self, x, c_noise, labels=None):
        return x


def micro_profile(family: str, reps: int) -> list[list]:
    """Per-step cost of the pieces the ablations point at, timed in isolation (milliseconds)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(overrides(family, 1), run_dir)
        datamodule, model, trainer = build(cfg)
    from lightning_diffusion.lightning.callbacks import EMA
    from torch.optim.swa_utils import AveragedModel
    ema = EMA()
    averaged = AveragedModel(model, multi_avg_fn=ema._average_all, use_buffers=True)
    params = list(model.parameters())
    shadow = [p.detach().clone() for p in params]
    x = torch.randn(128, 1, 8, 8)
    t = model.draw_noise_levels(128)
    noise = torch.randn_like(x)
    loss, logsnr = model.loss(x, None, t, noise)
    def per_bin_masks():  # the tensor work of the per-bin logging, without its self.log_dict call
        model.bins.means(model.bins.names, *model.bins.sums_and_counts(loss.detach(), logsnr.detach()), "loss")

    def grad_check():
        torch.isfinite(torch.stack([p.norm() for p in params]).sum())

    pieces = {
        "EMA: AveragedModel.update_parameters (Lightning WeightAveraging)": lambda: averaged.update_parameters(model),
        "EMA: torch._foreach_lerp_ (hand loop)":
            lambda: torch._foreach_lerp_(shadow, [p.detach() for p in params], 0.01),
        "per-bin loss sums and counts (tensor work only)": per_bin_masks,
        "gradient finiteness check (norm per parameter)": grad_check,
        "noise levels: stratified_draws + inverse CDF": lambda: model.draw_noise_levels(128),
        "float64 x_t coefficients + loss (model.loss, network excluded)": None,
    }
    from lightning_diffusion.core.noise_levels import log_normal
    from lightning_diffusion.core.processes import EDMProcess
    edm, u = EDMProcess(), torch.rand(128, dtype=torch.float64)
    pieces["EDM noise levels: log_normal via 64-step bisection t_of_logsnr"] = lambda: log_normal(u, edm)
    pieces["EDM noise levels: closed form sigma = exp(P_mean + P_std z)"] = \
        lambda: (-1.2 + 1.2 * torch.special.ndtri(u)).exp().clamp(edm.t_min, edm.t_max)
    net = model.denoiser.network
    rows = []
    for name, fn in pieces.items():
        if fn is None:  # model.loss with the network replaced by an identity of the same output shape
            model.denoiser.network = PassThrough()
            fn = lambda: model.loss(x, None, t, noise)  # noqa: E731
        times = [timed(fn) for _ in range(reps)]
        model.denoiser.network = net
        rows.append([name, 1e3 * median(times)])
    return rows


def main():
    args = arguments(__doc__.splitlines()[0], profile="instead: ablations and micro-timings of our overhead")
    header("Training overhead: images/s, ours vs a hand-written loop (same U-Net) vs diffusers", args.quick)
    steps, warmup, rounds = (4, 1, 1) if args.quick else ((22, 3, 2) if args.profile else (22, 3, 3))
    batch = 128

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(overrides("ddpm", steps), run_dir)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        from lightning_diffusion.lightning.builder import data_meta
        from omegaconf import open_dict
        with open_dict(cfg):
            cfg.data_meta = data_meta(datamodule.shape, datamodule.num_classes)
        net_cfg = cfg.network

    loops = {family: hand_loop(family, datamodule, net_cfg) for family in ("ddpm", "edm")}
    torch.manual_seed(0)
    theirs = HandLoop(diffusers_unet(), diffusers_loss(), datamodule.num_classes, datamodule=datamodule)
    variants = {}
    if args.profile:  # where the time of our DDPM step goes, timed inside the same fits, next to the hand loop
        profiles = []
        variants["ours ddpm (instrumented)"] = lambda: profiles.append(profiled_ours("ddpm", steps, warmup)) or \
            profiles[-1]["step"]
        variants["hand ddpm"] = lambda: loops["ddpm"].run(steps, warmup)
        results = {name: median(v) for name, v in interleaved(variants, rounds).items()}
        hand = results["hand ddpm"]
        pieces = {k: median([p[k] for p in profiles]) for k in profiles[0]}
        rows = [[k, 1e3 * v, f"{100 * v / pieces['step']:.1f}%"] for k, v in pieces.items() if k != "step"]
        rows.append(["whole step (ours)", 1e3 * pieces["step"], "100%"])
        rows.append(["whole step (hand loop, same run)", 1e3 * hand, f"{100 * hand / pieces['step']:.1f}%"])
        table(f"where our DDPM step goes: ms per step timed inside the fit ({steps - warmup} steps x {rounds} rounds, "
              "medians over rounds; nested pieces marked)", ["piece", "ms/step", "share of our step"], rows)
        table("micro-timings of the pieces (isolated, per call, DDPM, batch 128)", ["piece", "ms"],
              micro_profile("ddpm", 5 if args.quick else 100))
        return
    for family in ("ddpm", "edm"):
        variants[f"ours {family}"] = lambda f=family: run_ours(f, steps, warmup)
        variants[f"hand {family}"] = lambda f=family: loops[f].run(steps, warmup)
    variants["diffusers UNet2DModel"] = lambda: theirs.run(steps, warmup)
    results = {name: median(v) for name, v in interleaved(variants, rounds).items()}

    n_ours = sum(p.numel() for p in loops["ddpm"].net.parameters())
    n_theirs = sum(p.numel() for p in theirs.net.parameters())
    rows = []
    for family in ("ddpm", "edm"):
        ours, hand = results[f"ours {family}"], results[f"hand {family}"]
        overhead = ours / hand - 1
        rows.append([family.upper(), batch / ours, batch / hand, f"{100 * overhead:+.1f}%",
                     "met" if overhead <= 0.05 else "missed"])
    table(f"ours vs hand-written loop, unet_tiny ({n_ours / 1e6:.2f}M parameters), 8x8 digits, batch {batch}, "
          f"{steps - warmup - 1} timed steps x {rounds} interleaved rounds",
          ["family", "ours images/s", "hand loop images/s", "overhead (ours / hand - 1)", "goal <= 5%"], rows)
    table("diffusers UNet2DModel + DDPMScheduler.add_noise in the same hand-written loop (a different network)",
          ["network", "parameters", "images/s", "relative to hand loop DDPM (unet_tiny)"],
          [["UNet2DModel (32/64, 1 block/level, attn at 4x4)", f"{n_theirs / 1e6:.2f}M",
            batch / results["diffusers UNet2DModel"], results["hand ddpm"] / results["diffusers UNet2DModel"]]])


if __name__ == "__main__":
    main()
