"""torch.compile and bf16-mixed on and off: cost per training step and per sampling network call (CPU here).

    python benchmarks/compile_bf16.py [--compile] [--quick]

The network is the main job's unet_tiny on 8x8 digits. Training: the hand-written DDPM step of
training_overhead.py (batch 128; forward, backward, clipping, Adam, EMA), and our LightningModule under the
Trainer with precision=32-true vs bf16-mixed. Sampling: one guided network call on 100 samples (batch 200,
no_grad), which is what a sampler step costs. Ratios are to eager float32 in the same run (interleaved,
medians); compile time (the first calls) is reported on its own. torch.compile rows need --compile: inductor's
compilation adds about 2 minutes on a quiet 2-core CPU (far more when other jobs share it), so the default run
leaves it out. On a GPU machine the same script measures the GPU (bf16 autocast on CUDA).
"""

import tempfile
import time

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from _common import arguments, compose, header, interleaved, median, table, timed
from lightning_diffusion.lightning.builder import data_meta
from training_overhead import HandLoop, ddpm_loss, run_ours


def autocast(enabled: bool):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def main():
    args = arguments(__doc__.splitlines()[0], compile="also torch.compile (minutes of compilation on a small CPU)")
    header("torch.compile / bf16-mixed on and off", args.quick)
    steps, warmup, rounds = (4, 1, 1) if args.quick else (12, 2, 3)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(["model=ddpm", "network=unet_tiny", "data=digits"], run_dir)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        with open_dict(cfg):
            cfg.data_meta = data_meta(datamodule.shape, datamodule.num_classes)
        torch.manual_seed(0)
        net = instantiate(cfg.network)

    compiled = torch.compile(net) if args.compile else None
    loop = {"eager": HandLoop(net, ddpm_loss(), 10, datamodule=datamodule)}
    if compiled is not None:
        loop["compiled"] = HandLoop(compiled, ddpm_loss(), 10, datamodule=datamodule)

    def train_step(kind: str, bf16: bool):
        def run():
            with autocast(bf16):
                return loop[kind].run(steps, warmup)
        return run

    x = torch.randn(200, 1, 8, 8)
    c = torch.rand(200) * 4 - 2
    y = torch.arange(200) % 11

    def sample_call(module, bf16: bool):
        def run():
            with torch.no_grad(), autocast(bf16):
                return median([timed(lambda: module(x, c, y)) for _ in range(steps)])
        return run

    compile_rows = []
    if compiled is not None:  # first calls compile: time them once, outside the comparison
        for name, fn in [("training step (forward + backward)", lambda: loop["compiled"].run(2, 0)),
                         ("training step, bf16 autocast", lambda: train_step("compiled", True)()),
                         ("sampling call (no_grad)", lambda: sample_call(compiled, False)()),
                         ("sampling call, bf16 autocast", lambda: sample_call(compiled, True)())]:
            start = time.perf_counter()
            fn()
            compile_rows.append([name, time.perf_counter() - start])

    variants = {}
    for kind in loop:
        for bf16 in (False, True):
            variants[f"train {kind} {'bf16' if bf16 else 'fp32'}"] = train_step(kind, bf16)
    for kind, module in [("eager", net)] + ([("compiled", compiled)] if compiled is not None else []):
        for bf16 in (False, True):
            variants[f"sample {kind} {'bf16' if bf16 else 'fp32'}"] = sample_call(module, bf16)
    lightning_steps = (4, 1) if args.quick else (16, 3)
    variants["lightning 32-true"] = lambda: run_ours("ddpm", *lightning_steps)
    variants["lightning bf16-mixed"] = lambda: run_ours("ddpm", *lightning_steps,
                                                        extra=["trainer.precision=bf16-mixed"])
    results = {k: median(v) for k, v in interleaved(variants, rounds).items()}

    rows = []
    for what, base in [("train", "train eager fp32"), ("sample", "sample eager fp32")]:
        for kind in ("eager", "compiled"):
            for precision in ("fp32", "bf16"):
                key = f"{what} {kind} {precision}"
                step = "training step (hand loop, batch 128)" if what == "train" else "sampling call (batch 200)"
                label = f"{step}, " \
                        f"{kind}, {precision}"
                if key in results:
                    rows.append([label, 1e3 * results[key], results[base] / results[key]])
                else:
                    rows.append([label, "not run (needs --compile)", ""])
    rows.append(["training step (ours, Lightning), precision=32-true", 1e3 * results["lightning 32-true"], 1.0])
    rows.append(["training step (ours, Lightning), precision=bf16-mixed", 1e3 * results["lightning bf16-mixed"],
                 results["lightning 32-true"] / results["lightning bf16-mixed"]])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table(f"ms per step on {device} (speed-up: eager fp32 time / this time, same run)", ["variant", "ms", "speed-up"],
          rows)
    if compile_rows:
        table("torch.compile: first calls (compilation included), seconds", ["what", "s"], compile_rows)


if __name__ == "__main__":
    main()
