"""What long commands show while they work (issue 23, item 18): `sample` / `evaluate` bars that move at every
network evaluation across batches, a bar over the main job's final sampling, `optimize_grid`'s and
`train_extractor`'s bars, and the autoencoder run's final PSNR line and metrics.json."""

import json

import pytest
import torch

from helpers import FAST, compose_config
from lightning_diffusion.lightning import optimized_grids, sampling
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.callbacks import samples
from lightning_diffusion.lightning.metrics import digits_extractor
from lightning_diffusion.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def spy(monkeypatch, module, name: str) -> list:
    """Replace module.<name> (a bar factory) by one whose bars record (total, n) after every update."""
    seen, real = [], getattr(module, name)

    def recording_factory(*args, **kwargs):
        bar = real(*args, **kwargs)
        update = bar.update

        def recording(n=1):
            update(n)
            seen.append((bar.total, bar.n))
        bar.update = recording
        return bar

    monkeypatch.setattr(module, name, recording_factory)
    return seen


def tiny_model(tmp_path, *overrides):
    _, model, _ = build(compose_config(FAST + ["network.channels=16", "model.process.T=50", "grid.steps=4",
                                               *overrides], tmp_path))
    return model.eval()


def test_the_sampling_bar_moves_at_every_network_evaluation_across_batches(tmp_path, monkeypatch):
    """`sample`'s bar moved once per 500-sample batch (0 % until done below 500): now one unit per denoiser call."""
    seen = spy(monkeypatch, sampling, "sampling_bar")
    model = tiny_model(tmp_path)
    x, _, nfe = sampling.draw(model, n=10, batch_size=4, seed=0)  # 3 batches of 4 NFE each
    assert nfe == 4 and x.shape[0] == 10
    assert seen == [(12, k) for k in range(1, 13)]


@pytest.mark.slow
def test_the_main_jobs_final_sampling_has_a_bar(tmp_path, monkeypatch):
    seen = spy(monkeypatch, samples, "sampling_bar")
    overrides = [o for o in FAST if not o.startswith("trainer.enable_progress_bar")]
    train(compose_config(overrides + ["trainer.max_steps=2", "network.channels=16", "model.process.T=50",
                                      "grid.steps=3", "callbacks.sample_grid=null"], tmp_path / "run"))
    assert seen == [(3, 1), (3, 2), (3, 3)]  # one batch, 3 network evaluations


@pytest.mark.slow
def test_optimize_grid_shows_its_network_evaluations(tmp_path, monkeypatch):
    seen = spy(monkeypatch, optimized_grids, "progress_bar")
    run_dir = tmp_path / "run"
    train(compose_config(FAST + ["data=moons", "network=mlp", "trainer.max_steps=2", "callbacks.final_samples=null",
                                 "callbacks.sample_grid=null"], run_dir))
    cfg = compose_config(["sampler=ddim"])
    optimized_grids.optimize_checkpoint_grid(str(run_dir / "checkpoints" / "last.ckpt"), "ddim", cfg.sampler,
                                             cfg.grid, 3, n=8, iterations=4, reference_steps=4)
    total = seen[0][0]
    assert total == (2 * 4 - 1) + (4 + 4) * 3  # Heun's reference (2 steps - 1) + 4 candidates and 4 runs of 3 NFE
    assert [n for _, n in seen] == list(range(1, len(seen) + 1)) and len(seen) >= 7 + 4 * 3


def test_train_extractor_shows_its_steps(tmp_path, monkeypatch):
    seen = spy(monkeypatch, digits_extractor, "progress_bar")
    digits_extractor.train_digits_extractor(tmp_path / "cnn.pt", epochs=1, batch_size=512)
    assert seen == [(4, 1), (4, 2), (4, 3), (4, 4)]  # 1617 training digits in batches of 512


@pytest.mark.slow
def test_the_autoencoder_run_ends_with_its_psnr_and_metrics_json(tmp_path, caplog):
    overrides = [o for o in FAST if not o.startswith("callbacks.")]
    with caplog.at_level("INFO"):
        train(compose_config(overrides + ["experiment=autoencoder", "trainer.max_steps=2"], tmp_path / "ae"))
    metrics = json.loads((tmp_path / "ae" / "metrics.json").read_text())
    assert metrics["final/num_images"] == 180 and metrics["final/psnr"] == pytest.approx(
        10 * torch.log10(torch.tensor(4.0 / metrics["final/mse"])).item())
    assert "final reconstructions: final/mse=" in caplog.text
