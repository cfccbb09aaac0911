"""Latents encoded once to disk: every image once (also over two DDP ranks), resumable after a kill, refused when
they are of another encode, and trained on with the loss of encoding every batch on the fly.

The first stage is a small random diffusers AutoencoderKL on the 8x8 digits (saved with save_pretrained, read by
first_stage=sd_vae), so the moments are those of a real encoder, deterministic and cheap.
"""

import json
import math
import subprocess
import sys

import diffusers
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from helpers import FAST, compose_config, entry_point_env
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.data import DigitsDataModule
from lightning_diffusion.lightning.latents import LatentDataModule, encode_latents, shard_path
from lightning_diffusion.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1797  # the digits
SHARD = 400  # -> 5 shards, the last one short


def save_autoencoder(folder, seed=0):
    torch.manual_seed(seed)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                            latent_channels=2, norm_num_groups=4, sample_size=8).save_pretrained(folder)
    return folder


def stage_overrides(folder):
    return ["first_stage=sd_vae", f"first_stage.source={folder}", "first_stage.image_size=8"]


def first_stage_of(folder):
    cfg = compose_config(stage_overrides(folder))
    return instantiate(cfg.first_stage), cfg


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    return save_autoencoder(tmp_path_factory.mktemp("vae") / "vae")


def encode(folder, out, **kwargs):
    stage, cfg = first_stage_of(folder)
    return encode_latents(DigitsDataModule(), stage, out, cfg.data, cfg.first_stage, shard_size=SHARD, **kwargs)


def read_shards(out):
    return [torch.load(shard_path(out, k), weights_only=True) for k in range(math.ceil(N / SHARD))]


def test_every_image_is_encoded_once_and_read_back_as_its_moments(autoencoder, tmp_path):
    manifest = encode(autoencoder, tmp_path / "latents", flips=True)
    shards = read_shards(tmp_path / "latents")
    assert manifest["encoded_per_rank"] == [N] and manifest["num_shards"] == 5 == len(list(tmp_path.glob("*/shard-*")))
    assert torch.equal(torch.cat([s["index"] for s in shards]), torch.arange(N))
    stage, _ = first_stage_of(autoencoder)
    x, y = DigitsDataModule().load().tensors
    torch.testing.assert_close(torch.cat([s["moments"] for s in shards]), stage.moments(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([s["moments_flipped"] for s in shards]), stage.moments(x.flip(-1)),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([s["labels"] for s in shards]), y)
    data = LatentDataModule(str(tmp_path / "latents"), hflip=True)
    assert data.shape == (1, 8, 8) and data.num_classes == 10
    data.setup()
    i = data._train_plain.indices[0]
    plain, label = data.val_dataset.dataset[i]
    torch.testing.assert_close(plain, shards[i // SHARD]["moments"][i % SHARD])
    assert int(label) == int(y[i])
    draws = {bool(torch.equal(data.train_dataset[0][0], plain)) for _ in range(20)}
    assert draws == {True, False}  # the mirrored image's moments half of the time, the image's own otherwise


def test_a_killed_encode_resumes_without_encoding_finished_shards_again(autoencoder, tmp_path):
    out = tmp_path / "latents"

    def kill_after_two(k):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode(autoencoder, out, on_shard=kill_after_two)
    finished = {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 1)}
    assert not shard_path(out, 2).exists() and not (out / "manifest.json").exists()
    (out / f".{shard_path(out, 2).name}.dead").write_bytes(b"half a shard")  # a write killed midway
    with pytest.raises(FileNotFoundError, match=r"no manifest.json \(an unfinished encode: run it again, it resumes"):
        LatentDataModule(str(out))
    manifest = encode(autoencoder, out)
    assert manifest["encoded_per_rank"] == [N - 2 * SHARD]
    assert {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 1)} == finished
    assert not list(out.glob(".shard-*")) and torch.equal(torch.cat([s["index"] for s in read_shards(out)]),
                                                          torch.arange(N))


def test_resuming_another_encode_into_the_folder_is_refused(autoencoder, tmp_path):
    out = tmp_path / "latents"
    encode(autoencoder, out)
    stage, cfg = first_stage_of(autoencoder)
    with pytest.raises(ValueError, match=r"holds latents of another encode \(num_shards, shard_size differ"):
        encode_latents(DigitsDataModule(), stage, out, cfg.data, cfg.first_stage, shard_size=300)
    other = save_autoencoder(tmp_path / "other", seed=1)
    stage, _ = first_stage_of(other)
    with pytest.raises(ValueError, match=r"another autoencoder"):
        encode_latents(DigitsDataModule(), stage, out, cfg.data, cfg.first_stage, shard_size=SHARD)
    with pytest.raises(ValueError, match=r"not the autoencoder that encoded"):  # a model's first stage, at fit start
        LatentDataModule(str(out)).encode_splits(stage.moments)
    with pytest.raises(ValueError, match=r"hflip=true, but .* was encoded without mirrored images"):
        LatentDataModule(str(out), hflip=True)
    with pytest.raises(ValueError, match=r"set model.latent_cache=true"):
        LatentDataModule.check_training(latent_cache=False)


def losses(run_dir):
    logged = pd.read_csv(run_dir / "csv" / "metrics.csv")[["step", "train/loss"]].dropna()
    return torch.tensor(logged["train/loss"].to_numpy())


def per_sample_losses(cfg, batches: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses, labels) of the first train batches of a built config, each with its own seeded draws."""
    torch.manual_seed(0)
    datamodule, model, _ = build(cfg)
    if model.latent_cache:
        datamodule.encode_splits(model.first_stage.moments)  # what fitting starts with: the first stage checked
    losses, labels = [], []
    for k, (x, y) in zip(range(batches), datamodule.train_dataloader()):
        generator = torch.Generator().manual_seed(k)
        x0 = model.to_latent(x, generator)
        t = model.noise_levels(torch.rand(len(x), generator=generator, dtype=torch.float64), model.process)
        with torch.no_grad():
            losses.append(model.loss(x0, y, t, torch.randn(x0.shape, generator=generator))[0])
        labels.append(y)
    return torch.cat(losses), torch.cat(labels)


def test_training_on_latents_gives_the_loss_of_encoding_every_batch(autoencoder, tmp_path):
    """Same seed, same batches: each sample's loss with z drawn from the stored moments = with z drawn from moments
    computed on the fly (to float32 rounding of the two encodings, ~1e-5), for EDM (whose loss depends on the latents
    from the first step; a zero-initialised eps-network's loss is ||eps||^2 whatever the data). A short fit on the
    latents runs and starts from the same loss."""
    encode(autoencoder, tmp_path / "latents")
    common = FAST + stage_overrides(autoencoder) + ["model=edm", "trainer.max_steps=3", "network.attn_resolutions=[4]",
                                                    "network.channels=16", "data.batch_size=32",
                                                    "callbacks.sample_grid=null", "callbacks.final_samples=null"]
    common = [o for o in common if not o.startswith(("callbacks.sample_grid.n", "callbacks.final_samples."))]
    from_disk = common + ["data=latents", f"data.path={tmp_path / 'latents'}", "data.image_size=8",
                          "model.latent_cache=true"]
    on_the_fly, labels = per_sample_losses(compose_config(common, tmp_path / "a"))
    stored, stored_labels = per_sample_losses(compose_config(from_disk, tmp_path / "b"))
    assert torch.equal(stored_labels, labels) and len(stored) == 96
    gap = float(((stored - on_the_fly).abs() / on_the_fly.abs()).max())
    print(f"per-sample losses, stored vs on-the-fly moments: max relative gap {gap:.2e}")
    torch.testing.assert_close(stored, on_the_fly, rtol=1e-4, atol=1e-6)
    train(compose_config(common, tmp_path / "on_the_fly"))
    train(compose_config(from_disk, tmp_path / "from_disk"))
    first_fly, first_disk = losses(tmp_path / "on_the_fly")[0], losses(tmp_path / "from_disk")[0]
    assert len(losses(tmp_path / "from_disk")) == 3 and float(first_disk) == pytest.approx(float(first_fly), rel=2e-4)


@pytest.mark.slow
def test_two_ddp_ranks_encode_each_image_once(autoencoder, tmp_path):
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "lightning_diffusion.encode_latents", *stage_overrides(autoencoder),
               f"out_dir={out}", f"shard_size={SHARD}", "devices=2", "accelerator=cpu", "strategy=ddp"]
    done = subprocess.run(command, cwd=tmp_path, env=entry_point_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # shards 0, 2, 4 on rank 0 and 1, 3 on rank 1
    assert manifest["encoded_per_rank"] == [3 * SHARD - (5 * SHARD - N), 2 * SHARD]
    assert len(list(out.glob("shard-*.pt"))) == 5 and not list(out.glob(".shard-*"))
    assert torch.equal(torch.cat([s["index"] for s in read_shards(out)]), torch.arange(N))
