"""Latent diffusion: the KL autoencoder (first stage) and any family on its latents (second stage).

* The first stage's math against closed forms: the KL term, posterior samples, the hinge loss, LDM's adaptive
  weight, and that each player's gradient reaches only its own weights.
* `model=<any family> first_stage=autoencoder` builds on a trained autoencoder's checkpoint; bad first stages are
  refused before training; the latent cache holds exactly the moments the encoder gives.
* Slow: on the 8x8 digits the autoencoder reconstructs above 25 dB PSNR, and latent DDPM and latent EDM (the
  latter from a latent cache) give guided samples a real-digit classifier labels as asked >= 70% of the time.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from helpers import FAMILIES, FAST, compose_config
from lightning_diffusion.networks.kl_autoencoder import (KLAutoencoder, PatchDiscriminator, gaussian_kl, gaussian_sample,
                                              hinge_discriminator_loss)
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.data import DigitsDataModule
from lightning_diffusion.lightning.checkpoints import load_first_stage
from lightning_diffusion.lightning.models import AutoencoderModel, DiffusionModel
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.train import train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"]
AE_FAST = ["experiment=autoencoder", *QUIET, "trainer.max_steps=4", "trainer.val_check_interval=2",
           "callbacks.checkpoint.every_n_train_steps=2"]


def moments_of(mean, logvar):
    return torch.cat([mean, logvar], dim=1)


# ---------------------------------------------------------------- first-stage math


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(moments_of(mean, logvar)), expected)


def test_posterior_samples_have_the_posterior_moments():
    mean, logvar = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1), torch.tensor([0.0, math.log(0.25)]).view(1, 2, 1, 1)
    z = gaussian_sample(moments_of(mean, logvar).expand(200_000, -1, -1, -1), torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0).flatten(), torch.tensor([1.5, -2.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0).flatten(), torch.tensor([1.0, 0.5]), atol=0.01, rtol=0)


def test_hinge_loss_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = 0, 0.5, 2 -> mean 5/6; relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


def test_autoencoder_shapes_and_bad_sizes():
    ae = KLAutoencoder(in_channels=1, image_size=8, latent_channels=2, channel_mult=(1, 2))
    x = torch.randn(5, 1, 8, 8)
    recon, moments = ae(x)
    assert ae.latent_shape == (2, 4, 4) and moments.shape == (5, 4, 4, 4) and recon.shape == x.shape
    with pytest.raises(ValueError, match="image_size=6 is not divisible by the down-sampling factor 4"):
        KLAutoencoder(in_channels=1, image_size=6, channel_mult=(1, 2, 2))


def adversarial_model(disc_start=0):
    ae = KLAutoencoder(in_channels=1, image_size=8, channels=16)
    return AutoencoderModel(ae, torch.optim.Adam, sample_shape=(1, 8, 8), discriminator=PatchDiscriminator(1, 16),
                            disc_start=disc_start, disc_weight=0.5)


def test_each_player_gets_only_its_own_gradient():
    """The joint loss's gradient on D is the hinge loss's alone, and on the autoencoder excludes the hinge loss."""
    model = adversarial_model()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    model.log = model.log_dict = lambda *a, **k: None
    torch.manual_seed(3)
    model.training_step((x, torch.zeros(6, dtype=torch.long)), 0).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    torch.manual_seed(3)  # the same posterior sample
    recon, moments = model.network(x)
    hinge_discriminator_loss(model.discriminator(x), model.discriminator(recon.detach())).backward()
    for name, p in model.discriminator.named_parameters():
        torch.testing.assert_close(joint[f"discriminator.{name}"], p.grad)

    model.zero_grad()
    torch.manual_seed(3)
    recon, moments = model.network(x)
    rec = model.reconstruction_loss(x, recon).mean()
    frozen_d = {k: v.detach() for k, v in model.discriminator.named_parameters()}
    g_loss = -torch.func.functional_call(model.discriminator, frozen_d, (recon,)).mean()
    weight = 0.5 * model.adaptive_weight(rec, g_loss)
    (rec + model.kl_weight * gaussian_kl(moments).mean() + weight * g_loss).backward()
    for name, p in model.network.named_parameters():
        torch.testing.assert_close(joint[f"network.{name}"], p.grad)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    model = adversarial_model()
    recon, _ = model.network(torch.randn(4, 1, 8, 8))
    rec, g_loss = recon.abs().sum(), -model.discriminator(recon).mean()
    last = model.network.last_layer
    expected = torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4)
    torch.testing.assert_close(model.adaptive_weight(rec, g_loss), expected)


def test_autoencoder_trains_with_its_discriminator_from_disc_start(tmp_path):
    """experiment=autoencoder with LDM's patch discriminator: the adversarial terms appear from disc_start on."""
    disc = "{_target_: lightning_diffusion.networks.kl_autoencoder.PatchDiscriminator, in_channels: ${data_meta.channels}}"
    train(compose_config(AE_FAST + [f"model.discriminator={disc}", "model.disc_start=2", "trainer.log_every_n_steps=1"],
                         tmp_path))
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    steps = log.dropna(subset=["train/d_loss"])["step"]
    assert sorted(steps) == [2, 3] and log["train/adaptive_weight"].dropna().gt(0).all()
    assert (tmp_path / "reconstructions").is_dir() and "val/psnr" in log


def test_bad_autoencoder_arguments_are_refused():
    ae = KLAutoencoder(in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="reconstruction must be 'l1' or 'l2', got 'l3'"):
        AutoencoderModel(ae, torch.optim.Adam, sample_shape=(1, 8, 8), reconstruction="l3")
    with pytest.raises(ValueError, match=r"built for data of shape \(1, 8, 8\), the data are \(3, 8, 8\)"):
        AutoencoderModel(ae, torch.optim.Adam, sample_shape=(3, 8, 8))


# ---------------------------------------------------------------- second stage on a (briefly) trained first stage


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("autoencoder")
    train(compose_config(AE_FAST, run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def test_the_checkpoint_stores_one_over_the_latent_std(autoencoder_ckpt):
    checkpoint = torch.load(autoencoder_ckpt, weights_only=False)
    stage = load_first_stage(str(autoencoder_ckpt))
    x = DigitsDataModule().train_tensor(512)
    z = gaussian_sample(stage.moments(x), torch.Generator().manual_seed(0))
    assert checkpoint["latent_scale"] == pytest.approx(1 / float(z.double().std()), rel=1e-5)
    assert stage.scale == checkpoint["latent_scale"]


def test_first_stage_is_frozen_and_scales_latents(autoencoder_ckpt):
    stage = load_first_stage(str(autoencoder_ckpt))
    stage.train()
    assert not stage.training and not stage.autoencoder.training
    assert not any(p.requires_grad for p in stage.parameters())
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    z = stage.encode(x, torch.Generator().manual_seed(0))
    unscaled = gaussian_sample(stage.autoencoder.encode(x), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, stage.scale * unscaled)
    torch.testing.assert_close(stage.decode(z), stage.autoencoder.decode(unscaled))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_on_the_latents(family, autoencoder_ckpt, tmp_path):
    cfg = compose_config([f"model={family}", "first_stage=autoencoder", f"first_stage.ckpt_path={autoencoder_ckpt}",
                          "logger=csv"], tmp_path)
    _, model, _ = build(cfg)
    _, plain, _ = build(compose_config([f"model={family}", "logger=csv"], tmp_path / "pixels"))
    assert isinstance(model, DiffusionModel) and model.sample_shape == (2, 4, 4)
    assert type(model.process) is type(plain.process)
    assert type(model.denoiser.parameterization) is type(plain.denoiser.parameterization)
    assert model.denoiser.network.conv_in.in_channels == 2  # the U-Net sized for the latents
    params = {id(p) for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert not any(id(p) in params for p in model.first_stage.parameters())


def test_latent_runs_have_a_run_dir_name_of_their_own():
    """Issue 23, item 19: latent runs landed in runs/edm-digits/ (and its `latest`) like the pixel runs."""
    assert compose_config(["model=edm"]).name == "edm-digits"
    assert compose_config(["model=edm", "first_stage=autoencoder", "first_stage.ckpt_path=x"]).name == \
        "edm-digits-autoencoder"


def test_latent_edm_uses_unit_sigma_data(autoencoder_ckpt, tmp_path):
    cfg = compose_config(["model=edm", "first_stage=autoencoder", f"first_stage.ckpt_path={autoencoder_ckpt}"],
                         tmp_path)
    assert cfg.model.parameterization.sigma_data == 1.0 and cfg.model.weighting.sigma_data == 1.0


def test_bad_first_stages_are_refused_before_training(autoencoder_ckpt, tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(ConfigError, match=f"first-stage checkpoint {missing} does not exist.*experiment=autoencoder"):
        build(compose_config(["first_stage=autoencoder", f"first_stage.ckpt_path={missing}"], tmp_path))
    with pytest.raises(ConfigError, match=r"trained on data of shape \(1, 8, 8\), but these data are \(1, 16, 16\)"):
        build(compose_config(["first_stage=autoencoder", "data=digits16", f"first_stage.ckpt_path={autoencoder_ckpt}"],
                             tmp_path))
    diffusion_run = tmp_path / "ddpm"
    train(compose_config(FAST + ["trainer.max_steps=2"], diffusion_run))
    with pytest.raises(ConfigError, match="DiffusionModel, not of an autoencoder"):
        build(compose_config(["first_stage=autoencoder", f"first_stage.ckpt_path={diffusion_run}/checkpoints/last.ckpt"],
                             tmp_path))


def test_latent_cache_holds_the_encoders_moments(autoencoder_ckpt):
    stage = load_first_stage(str(autoencoder_ckpt))
    datamodule = DigitsDataModule(val_fraction=0.1)
    datamodule.setup()
    x, y = datamodule.train_dataset[3]
    datamodule.encode_splits(stage.moments)
    moments, cached_y = datamodule.train_dataset[3]
    torch.testing.assert_close(moments, stage.moments(x[None])[0])
    assert cached_y == y and len(datamodule.val_dataset) == 180
    with pytest.raises(ValueError, match="data.hflip=false"):
        DigitsDataModule(hflip=True).encode_splits(stage.moments)


def test_latent_cache_needs_a_first_stage(tmp_path):
    with pytest.raises(ConfigError, match="latent_cache=True caches a first stage's latents"):
        build(compose_config(["model.latent_cache=true"], tmp_path))


def test_a_latent_run_trains_and_decodes_its_samples(autoencoder_ckpt, tmp_path):
    overrides = ["first_stage=autoencoder", "model.latent_cache=true", f"first_stage.ckpt_path={autoencoder_ckpt}",
                 *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.sample_grid.n=4",
                 "callbacks.final_samples.n_per_class=1", "callbacks.checkpoint.every_n_train_steps=2"]
    metrics = train(compose_config(overrides, tmp_path))
    samples = np.load(tmp_path / "samples" / "final.npz")["samples"]
    assert samples.shape == (10, 1, 8, 8) and metrics["final/num_samples"] == 10
    model, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")  # what sample / evaluate read back
    x, _ = model.generate(3, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and model.first_stage is not None


# ---------------------------------------------------------------- slow: the digits, end to end


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("autoencoder_digits")
    metrics = train(compose_config(["experiment=autoencoder", *QUIET, "trainer.limit_val_batches=null",
                                    "trainer.val_check_interval=1000"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt", metrics


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_autoencoder_reconstructs_the_digits(trained_autoencoder):
    _, metrics = trained_autoencoder
    assert metrics["val/psnr"] >= 25.0, metrics  # 28.9 dB measured after its 1000 steps


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("family,cache", [("ddpm", False), ("edm", True)])
def test_latent_family_learns_the_digits(family, cache, trained_autoencoder, tmp_path):
    ckpt, _ = trained_autoencoder
    overrides = [f"model={family}", "first_stage=autoencoder", f"model.latent_cache={cache}",
                 f"first_stage.ckpt_path={ckpt}", *QUIET, "trainer.max_steps=1000",
                 "trainer.val_check_interval=1000", "callbacks.sample_grid=null", "callbacks.checkpoint=null",
                 "callbacks.final_samples.n_per_class=30"]
    metrics = train(compose_config(overrides, tmp_path))
    assert metrics["final/num_samples"] == 300
    assert metrics["final/classifier_accuracy"] >= 0.7, metrics  # 1.0 measured for both
