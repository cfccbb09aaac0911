"""Sampling overhead: wall time of our samplers against the bare sum of their network calls, and memory per sample.

    python benchmarks/sampling_overhead.py [--quick]

The main job's set-up: the class-conditional unet_tiny on 8x8 digits (untrained: timing does not depend on the
weights), `DiffusionModel.generate` with classifier-free guidance (w = 2, so every network call sees 2n images).
For each sampler, one recorded pass stores the exact inputs of every network call; the "bare" time replays
those calls on the network alone, in a loop, so the ratio sampler / bare is everything the sampler, the
Denoiser's preconditioning, guidance and the float64 state cost on top of the network (interleaved rounds,
medians). On a loaded machine that difference of two large times is noisy, so the sampler is also timed with
the network swapped for a free stand-in (zeros): that time over the bare calls' time is the overhead measured
directly, and the goal is judged on it. Memory per sample: peak resident memory (VmHWM after resetting it
through /proc/self/clear_refs)
of a fresh process drawing n samples, minus its resident memory just before, divided by n; the same for one
bare guided network call on n samples. Linux only for the memory table.
"""

import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from _common import arguments, compose, header, interleaved, median, table, timed
from lightning_diffusion.core import samplers as S
from lightning_diffusion.lightning.builder import build

HERE = Path(__file__).resolve().parent


def sampler_specs(quick: bool) -> dict:
    """name -> (family, sampler, grid); about 10 NFE each (2 in --quick)."""
    n = 2 if quick else 10
    ode = lambda solver: partial(S.pf_ode, solver=solver)  # noqa: E731
    karras = lambda steps: partial(S.karras_times, steps=steps)  # noqa: E731
    return {
        "ancestral (DDPM, strided)": ("ddpm", S.ancestral, partial(S.strided_times, steps=n)),
        "ddim (DDPM, strided)": ("ddpm", S.ddim, partial(S.strided_times, steps=n)),
        "euler_maruyama (DDPM, uniform)": ("ddpm", S.euler_maruyama, partial(S.uniform_times, steps=n)),
        "predictor_corrector (DDPM, uniform)": ("ddpm", S.predictor_corrector,
                                                partial(S.uniform_times, steps=max(n // 2, 1))),
        "pf_ode heun (DDPM, karras)": ("ddpm", ode(S.heun), karras(max(n // 2 + 1, 2))),
        "pf_ode euler (EDM, karras)": ("edm", ode(S.euler), karras(n)),
        "pf_ode heun (EDM, karras)": ("edm", ode(S.heun), karras(max(n // 2 + 1, 2))),
        "pf_ode dpm_solver_pp_2m (EDM, karras)": ("edm", ode(S.dpm_solver_pp_2m), karras(n)),
    }


def make_model(family: str):
    with tempfile.TemporaryDirectory() as run_dir:
        torch.manual_seed(0)
        cfg = compose([f"model={family}", "network=unet_tiny", "data=digits", "logger=csv", "~callbacks"], run_dir)
        _, model, _ = build(cfg)
    return model.eval()


def sample_fn(model, spec, n: int):
    """A call drawing n guided samples with one sampler, as the main job's FinalSamples does."""
    _, sampler, grid = spec
    labels = torch.arange(n) % model.num_classes

    def draw():
        return model.generate(n, labels, sampler=sampler, grid=grid, generator=torch.Generator().manual_seed(0))

    return draw


def record_calls(model, draw) -> list[tuple]:
    """The positional inputs of every network call one sampling pass makes."""
    calls = []
    hook = model.denoiser.network.register_forward_pre_hook(
        lambda module, args: calls.append(tuple(a.clone() if torch.is_tensor(a) else a for a in args)))
    try:
        draw()
    finally:
        hook.remove()
    return calls


class FreeNetwork(torch.nn.Module):
    """Stands in for the network at no cost (zeros of its output shape), so only the sampler's own work is timed."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.dtype_carrier = torch.nn.Parameter(torch.zeros(()))  # the Denoiser reads the network's dtype from it

    def forward(self, x, c_noise, labels=None):
        return x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])


def without_network(model, draw):
    """Time `draw` with the network swapped for FreeNetwork."""
    network = model.denoiser.network
    model.denoiser.network = FreeNetwork(network.out_channels)
    try:
        return timed(draw)
    finally:
        model.denoiser.network = network


def replay(network, calls):
    with torch.no_grad():
        for args in calls:
            network(*args)


# ---- memory: one fresh process per measurement ---------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(name: str, n: int, quick: bool) -> None:
    """Print the peak resident memory (bytes) added by drawing n samples with `name` ("network": one bare call)."""
    torch.set_num_threads(1)
    spec = sampler_specs(quick)[name] if name != "network" else ("ddpm", 1, {})
    model = make_model(spec[0])
    if name == "network":  # one guided call: 2n images, as the samplers' calls

        def call(k):
            return lambda: replay(model.denoiser.network, [(torch.randn(2 * k, *model.sample_shape), torch.randn(2 * k),
                                                            torch.arange(2 * k) % (model.num_classes + 1))])

        run = call(n)
        call(2)()  # warm-up, as for the samplers
    else:
        run = sample_fn(model, spec, n)
        sample_fn(model, spec, 2)()  # warm-up: lazy initialisations out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    run()
    print(1024 * (_rss_kib("VmHWM") - before))


def memory_per_sample(name: str, n: int, quick: bool) -> float:
    out = subprocess.run([sys.executable, str(HERE / "sampling_overhead.py"), "--memory-child", name, str(n)]
                         + (["--quick"] if quick else []), capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return int(out.stdout.strip().splitlines()[-1]) / n


def main():
    if "--memory-child" in sys.argv:
        i = sys.argv.index("--memory-child")
        return memory_child(sys.argv[i + 1], int(sys.argv[i + 2]), "--quick" in sys.argv)
    args = arguments(__doc__.splitlines()[0])
    header("Sampling overhead: our samplers vs the bare sum of their network calls", args.quick)
    n, rounds = (8, 1) if args.quick else (100, 3)
    specs = sampler_specs(args.quick)
    models = {family: make_model(family) for family in ("ddpm", "edm")}

    variants, nfe = {}, {}
    for name, spec in specs.items():
        model = models[spec[0]]
        draw = sample_fn(model, spec, n)
        calls = record_calls(model, draw)
        nfe[name] = len(calls)
        variants[f"{name} / sampler"] = lambda draw=draw: timed(draw)
        variants[f"{name} / bare"] = lambda m=model, calls=calls: timed(lambda: replay(m.denoiser.network, calls))
        variants[f"{name} / free network"] = lambda m=model, draw=draw: without_network(m, draw)
    results = {k: median(v) for k, v in interleaved(variants, rounds).items()}
    rows = []
    for name in specs:
        ours, bare, free = (results[f"{name} / {k}"] for k in ("sampler", "bare", "free network"))
        rows.append([name, nfe[name], 1e3 * ours, 1e3 * bare, f"{100 * (ours / bare - 1):+.1f}%", 1e3 * free,
                     f"{100 * free / bare:.1f}%", "met" if free / bare <= 0.05 else "missed"])
    table(f"wall time, {n} guided samples (network batch {2 * n}), medians of {rounds} interleaved rounds",
          ["sampler", "NFE", "sampler ms", "bare network calls ms", "overhead (sampler / bare - 1)",
           "sampler with a free network ms", "overhead (free / bare)", "goal <= 5% (free / bare)"], rows)

    if not Path("/proc/self/clear_refs").exists():
        print("memory per sample: needs Linux's /proc/self/clear_refs; skipped")
        return
    m = 8 if args.quick else 256
    names = ["network", "ancestral (DDPM, strided)"]
    if not args.quick:
        names += ["pf_ode heun (EDM, karras)", "pf_ode dpm_solver_pp_2m (EDM, karras)"]
    per = {name: memory_per_sample(name, m, args.quick) for name in names}
    table(f"peak memory per sample (CPU resident set; {m} guided samples in a fresh process)",
          ["what", "KiB per sample", "relative to one bare network call"],
          [["one bare guided network call" if k == "network" else k, v / 1024, v / per["network"]]
           for k, v in per.items()])


if __name__ == "__main__":
    main()
