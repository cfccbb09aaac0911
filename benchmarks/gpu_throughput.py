"""GPU training throughput: our step against a hand-written loop of the same network, and the data loader alone.

    python benchmarks/gpu_throughput.py [--budget 270] [--quick] [hydra overrides...]

The recipe is `experiment=edm_cifar10` (DDPM++, batch 512, EDM's loss) under trainer=gpu (bf16-mixed); overrides
change it (e.g. network=..., data.batch_size=...). Variants, interleaved round by round (medians of rounds):
  ours          the recipe's DiffusionModel under the Lightning Trainer: EMA, LR warm-up, logging, the recipe's
                callbacks minus sampling and checkpoint writing; augmentation off, and on (the recipe's p);
                eager, and compiled (model.compile_network=true)
  hand          the same network (same config and initialisation) in a minimal loop: EDM's preconditioned loss
                under bf16 autocast, Adam, LambdaLR warm-up, EMA by torch._foreach_lerp_; eager, and compiled
  loader        the recipe's ImageDataModule over a synthetic CIFAR-sized folder of PNGs (class sub-folders) with
                the recipe's workers and batch, nothing else running
The two step variants read the same in-memory batches, so their ratio is the step's overhead alone (goal <= 5%);
the loader's images/s against our step's say whether decoding keeps up (goal >= 3x). Steps are timed between
CUDA synchronisations around a window after warm-up steps (compilation falls in the warm-up). Whatever does not run
(no CUDA, the time budget spent, a network without augmentation labels) is listed with its reason.
--quick runs a few steps at batch 8 on the CPU (for rot, not numbers); compilation is left out there.
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from _common import compose, header, interleaved, median, quiet, table
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.callbacks import EMA

CUDA = torch.cuda.is_available()


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (for rot, not for numbers)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds; variants not started by then are listed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("overrides", nargs="*", help="hydra overrides of the recipe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    return args


def sync() -> float:
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


class Window(L.Callback):
    """Seconds per step over steps (warmup, last], between CUDA synchronisations."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last, self.seconds = warmup, last, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            self.start = sync()
        elif trainer.global_step == self.last:
            self.seconds = (sync() - self.start) / (self.last - self.warmup)


def recipe(overrides: list[str], steps: int, run_dir: str, extra=()):
    return compose(["experiment=edm_cifar10", f"trainer={'gpu' if CUDA else 'cpu'}", "trainer.precision=bf16-mixed",
                    "logger=csv", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                    "+trainer.num_sanity_val_steps=0", "~callbacks.sample_grid", "~callbacks.final_samples",
                    "~callbacks.checkpoint", *overrides, *extra], run_dir)


def batches(cfg, n: int, seed: int = 0):
    """n in-memory (x, y) batches of the recipe's shape, as a loader gives them (CPU tensors), for both loops."""
    g = torch.Generator().manual_seed(seed)
    shape, b = (3, cfg.data.image_size, cfg.data.image_size), cfg.data.batch_size
    return [(torch.rand(b, *shape, generator=g) * 2 - 1, torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def run_ours(overrides, data, warmup: int, timed: int, extra=()) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        _, model, trainer = build(recipe(overrides, warmup + timed, run_dir, extra))
        window = Window(warmup, warmup + timed)
        trainer.callbacks.append(window)
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))  # the batches as they are
        return window.seconds


class HandLoop:
    """EDM's step written out (Karras et al. 2022, Table 1): D = c_skip x + c_out F(c_in x, ln(sigma) / 4), weight
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, ln sigma ~ N(-1.2, 1.2^2); Adam, warm-up, EMA."""

    def __init__(self, cfg, compiled: bool):
        torch.manual_seed(0)
        self.device = torch.device("cuda" if CUDA else "cpu")
        self.net = instantiate(cfg.network).to(self.device)
        if compiled:
            self.net.compile()
        self.params = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.model.optimizer.lr, betas=(0.9, 0.999), eps=1e-8)
        warmup = cfg.model.lr_warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self.ema = [p.detach().clone() for p in self.params]
        self.ema_decay, self.n = EMA(cfg.callbacks.ema.half_life_steps, cfg.callbacks.ema.ramp).decay, 0
        self.conditional = cfg.conditional

    def loss(self, x0, y, sigma_data: float = 0.5):
        sigma = (-1.2 + 1.2 * torch.randn(x0.shape[0], device=self.device)).exp()
        s = sigma.view(-1, 1, 1, 1)
        norm = (s**2 + sigma_data**2).sqrt()
        x = x0 + s * torch.randn_like(x0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            F_x = self.net(x / norm, sigma.log() / 4, y if self.conditional else None).float()
        D = (sigma_data**2 / norm**2) * x + (s * sigma_data / norm) * F_x
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return (weight * ((D - x0) ** 2).flatten(1).mean(1)).mean()

    def step(self, x0, y):
        self.opt.zero_grad(set_to_none=True)
        self.loss(x0.to(self.device), y.to(self.device)).backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():  # the EMA callback's decay, its half-life ramped from step 0
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.ema_decay(self.n))
        self.n += 1

    def run(self, data, warmup: int, timed: int) -> float:
        for i in range(warmup):
            self.step(*data[i % len(data)])
        start = sync()
        for i in range(warmup, warmup + timed):
            self.step(*data[i % len(data)])
        return (sync() - start) / timed


def png_folder(root: Path, n: int, size: int = 32, classes: int = 10) -> Path:
    """n random RGB PNGs of size x size in `classes` sub-folders (CIFAR-10's layout and file sizes)."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / str(i % classes) / f"{i}.png")
    return root


def loader_rate(cfg, folder: Path, batches_timed: int) -> float:
    """Images/s of the recipe's train loader alone (after its first batch: workers started), over `folder`."""
    datamodule = instantiate(cfg.data)
    loader = iter(datamodule.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches_timed):
        next(loader)
    return batches_timed * cfg.data.batch_size / (time.perf_counter() - start)


class Budget:
    """Runs variants in interleaved rounds while time is left: images/s of each (median over its rounds), and the
    variants that never started, with why."""

    def __init__(self, deadline: float, seconds: float, rounds: int, batch: int):
        self.deadline, self.seconds, self.rounds, self.batch = deadline, seconds, rounds, batch
        self.rate, self.not_run = {}, {}

    def measure(self, variants: dict) -> None:
        def within(fn):
            return lambda: None if time.perf_counter() > self.deadline else fn()

        timings = interleaved({name: within(fn) for name, fn in variants.items()}, self.rounds)
        for name, values in timings.items():
            values = [v for v in values if v is not None]
            if values:
                self.rate[name] = self.batch / median(values)
            else:
                self.not_run[name] = f"the --budget of {self.seconds:.0f} s was spent before it started"


def main():
    args = arguments()
    header("GPU training throughput: ours vs a hand-written loop of the same network, and the loader alone", args.quick)
    warmup, timed, rounds = (1, 2, 1) if args.quick else (10, 30, 2)
    with tempfile.TemporaryDirectory() as tmp:  # the recipe's data: a folder of PNGs in its shape (offline)
        n = 64 if args.quick else 10_000
        folder = png_folder(Path(tmp) / "images", n, recipe(args.overrides, 1, tmp).data.image_size)
        overrides = ((["data.batch_size=8"] if args.quick else []) + ["data.name=null", f"data.path={folder}",
                     "data.image_column=image", f"data.cache_dir={Path(tmp) / 'cache'}"] + args.overrides)
        measure(args, overrides, warmup, timed, rounds, folder)


def measure(args, overrides: list[str], warmup: int, timed: int, rounds: int, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = recipe(overrides, warmup + timed, run_dir)
        _, model, _ = build(cfg)  # fills cfg.data_meta, which the hand loop's network reads
    data = batches(cfg, 4)
    params = sum(p.numel() for p in model.denoiser.network.parameters()) / 1e6
    network, batch, augment = type(model.denoiser.network).__name__, cfg.data.batch_size, cfg.model.get("augment")
    del model
    budget = Budget(time.perf_counter() + args.budget, args.budget, rounds, batch)
    # first what the goals compare (the loader, the eager step), compilation last: it takes the longest
    loader = loader_rate(cfg, folder, min(len(list(folder.rglob("*.png"))) // batch - 2, 15))
    eager = {"ours eager": lambda: run_ours(overrides, data, warmup, timed, ["model.augment=null"]),
             "hand eager": lambda h=HandLoop(cfg, compiled=False): h.run(data, warmup, timed)}
    if augment is not None:
        eager["ours eager augmented"] = lambda: run_ours(overrides, data, warmup, timed)
    else:
        budget.not_run["ours eager augmented"] = "model.augment is null (this network takes no augmentation labels)"
    budget.measure(eager)
    if args.quick:
        for name in ("ours compiled", "hand compiled"):
            budget.not_run[name] = "--quick: compilation takes minutes on a CPU; run without --quick"
    else:
        compiled = ["model.augment=null", "model.compile_network=true"]
        budget.measure({"ours compiled": lambda: run_ours(overrides, data, warmup, timed, compiled),
                        "hand compiled": lambda h=HandLoop(cfg, compiled=True): h.run(data, warmup, timed)})
    report(budget.rate, budget.not_run, loader, cfg, f"{network} ({params:.1f}M parameters)", augment,
           f"{timed} timed steps after {warmup}, {rounds} interleaved rounds")


def report(rate: dict, not_run: dict, loader: float, cfg, network: str, augment, timing: str) -> None:
    """The step table (ours vs hand, eager and compiled), the loader table, and what did not run."""
    rows = []
    for kind in ("eager", "compiled"):
        ours, hand = rate.get(f"ours {kind}"), rate.get(f"hand {kind}")
        overhead = f"{100 * (hand / ours - 1):+.1f}%" if ours and hand else "-"
        goal = ("met" if hand / ours - 1 <= 0.05 else "missed") if ours and hand else "-"
        rows.append([kind, ours or "not run", hand or "not run", overhead, goal])
    if "ours eager augmented" in rate and "ours eager" in rate:
        cost = rate["ours eager"] / rate["ours eager augmented"] - 1
        rows.append([f"eager, augmentation p={augment.p}", rate["ours eager augmented"], "-",
                     f"{100 * cost:+.1f}% vs ours without", "-"])
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    batch, size = cfg.data.batch_size, cfg.data.image_size
    table(f"training step: {network}, batch {batch}, bf16-mixed, {device}, {timing}",
          ["variant", "ours images/s", "hand loop images/s", "overhead (hand / ours - 1)", "goal <= 5%"], rows)
    step = rate.get("ours eager augmented") or rate.get("ours eager")
    table(f"data loader alone: the recipe's ImageDataModule over PNGs ({size}x{size}), batch {batch}",
          ["loader", "workers", "images/s", "x our eager step", "goal >= 3x"],
          [["decode + collate", cfg.data.num_workers, loader, loader / step if step else "-",
            ("met" if loader >= 3 * step else "missed") if step else "-"]])
    if not_run:
        table("not run", ["variant", "why"], [[k, v] for k, v in not_run.items()])


if __name__ == "__main__":
    main()
