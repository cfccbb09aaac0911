"""diffusers models in, offline: a random `UNet2DModel` at google/ddpm-cifar10-32's configuration and a random
`AutoencoderKL` at Stable Diffusion's VAE configuration, saved with `save_pretrained`, read by the project's loaders.

* The imported DDPM (a run directory of ours) gives D(x, t) equal to diffusers' own model + DDPMScheduler at 10
  timesteps, and a 20-step DDIM sample equal to diffusers' DDIMScheduler; `sample` and `evaluate` take it unchanged.
* The SD-VAE first stage encodes and decodes as diffusers' own model does, with DiT's scale or EDM2's per-channel
  normalisation as configured.
* Bad input is refused before anything is computed or written, naming the path and what was expected.
"""

import json
import time

import diffusers
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from helpers import compose_config
from lightning_diffusion.core.samplers import ddim
from lightning_diffusion.lightning.builder import ConfigError
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.convert.diffusers_models import autoencoder_kl
from lightning_diffusion.lightning.convert.imported import import_model
from lightning_diffusion.lightning.evaluation import evaluate
from lightning_diffusion.sample import sample
from test_metrics import digits_cnn_weights, save_png_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# google/ddpm-cifar10-32's config.json and scheduler_config.json (Ho et al. 2020's CIFAR-10 model in diffusers)
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
                    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
                    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True, variance_type="fixed_large")
# stabilityai/sd-vae-ft-mse's config.json
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256)
# a tiny UNet2DModel for the refusals (fast), and the network override that matches it
TINY = dict(DDPM_CIFAR10, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
TINY_NETWORK = ["network.config.block_out_channels=[32,32,32,32]", "network.config.norm_num_groups=8"]


def save_unet(folder, config=DDPM_CIFAR10, scheduler=DDPM_SCHEDULER, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config)
    model.save_pretrained(folder)
    if scheduler is not None:
        diffusers.DDPMScheduler(**scheduler).save_pretrained(folder)
    return folder


LOCAL_DATA: list[str] = []  # the experiment's data (CIFAR-10 from the Hub) as a local folder: set by `local_data`


@pytest.fixture(scope="module", autouse=True)
def local_data(tmp_path_factory):
    """A flat folder of 32x32 RGB PNGs standing in for CIFAR-10 (offline, the Hub data set is refused at build)."""
    folder = tmp_path_factory.mktemp("cifar_like")
    save_png_folder(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, folder / "images")
    LOCAL_DATA[:] = ["data=image_folder", f"data.path={folder / 'images'}", "data.image_size=32"]
    yield
    LOCAL_DATA.clear()


def import_overrides(source, *extra, published="ddpm_cifar10"):
    return [f"published={published}", f"source={source}", *LOCAL_DATA, *extra]


def imported(source, run_dir, *extra, published="ddpm_cifar10"):
    cfg = compose_config(import_overrides(source, *extra, published=published), run_dir, config_name="import_model")
    return import_model(cfg)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return save_unet(tmp_path_factory.mktemp("ddpm_cifar10") / "published")


# as diffusers' UNet2DModel itself (DiffusersUNet), and converted into the project's DDPM U-Net
@pytest.fixture(scope="module", params=["ddpm_cifar10", "ddpm_cifar10_unet"])
def ddpm(request, published, tmp_path_factory):
    """(published folder, imported checkpoint, our model, diffusers' own UNet2DModel and DDPMScheduler)."""
    source = published
    ckpt = imported(source, tmp_path_factory.mktemp("run"), published=request.param)
    model, _ = load_model(ckpt)
    assert type(model.denoiser.network).__name__ == ("UNet" if request.param.endswith("unet") else "DiffusersUNet")
    theirs = diffusers.UNet2DModel.from_pretrained(source).eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(source, clip_sample=False)
    return source, ckpt, model, theirs, scheduler


def test_imported_ddpm_denoiser_equals_diffusers_model_and_scheduler(ddpm):
    """D(x_t, t) of our DDPM family (c_noise = ddpm_step) = diffusers' pred_original_sample at 10 timesteps."""
    _, _, model, theirs, scheduler = ddpm
    steps = torch.tensor([0, 1, 9, 99, 250, 499, 500, 750, 998, 999])  # diffusers' 0-based timesteps
    x = torch.randn(len(steps), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.denoiser(x, (steps + 1).double())  # our t = diffusers' timestep + 1 (t = 0 is the data)
        reference = torch.cat([scheduler.step(theirs(x[i:i + 1], int(k)).sample, int(k), x[i:i + 1]).pred_original_sample
                               for i, k in enumerate(steps)])
    error = float((ours - reference).abs().max() / reference.abs().max())
    print(f"{type(model.denoiser.network).__name__}: D(x, t) at 10 timesteps, max |ours - diffusers| / max |diffusers| "
          f"= {error:.2e}")
    assert error <= 1e-5, error


def test_imported_ddpm_ddim_sample_equals_diffusers_ddim(ddpm):
    """20 DDIM steps (eta = 0) from the same noise: our `ddim` on diffusers' timesteps = diffusers' DDIMScheduler."""
    source, _, model, theirs, _ = ddpm
    scheduler = diffusers.DDIMScheduler.from_pretrained(source, clip_sample=False, set_alpha_to_one=True,
                                                        steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(20)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = x.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            reference = scheduler.step(theirs(reference, k).sample, k, reference, eta=0.0).prev_sample
        times = torch.cat([scheduler.timesteps.double() + 1, torch.zeros(1, dtype=torch.float64)])  # 951, ..., 1, 0
        ours = ddim(model.denoiser, model.process, x.double(), times).float()
    error = float((ours - reference).abs().max() / reference.abs().max())
    print(f"{type(model.denoiser.network).__name__}: 20-step DDIM sample, max |ours - diffusers| / max |diffusers| "
          f"= {error:.2e}")
    assert error <= 1e-5, error


def test_imported_run_samples_and_evaluates_unchanged(ddpm, tmp_path):
    """`sample` and `evaluate` read the imported checkpoint like one of ours (2 DDIM steps, digits-cnn features)."""
    _, ckpt, model, _, _ = ddpm
    cfg = compose_config([f"ckpt_path={ckpt}", "n=2", "batch_size=2", "sampler=ddim", "grid.steps=2",
                          f"out_dir={tmp_path / 'samples'}", "progress=false", "device=cpu"], config_name="sample")
    with np.load(sample(cfg)) as f:
        assert f["samples"].shape == (2, 3, 32, 32) and int(f["nfe"]) == 2
    reference = save_png_folder(torch.rand(8, 3, 32, 32) * 2 - 1, tmp_path / "reference")
    result = evaluate(compose_config([
        f"ckpt_path={ckpt}", "logger=csv", "feature_extractor=digits-cnn",
        f"feature_extractor_weights_path={digits_cnn_weights()}", f"cache_dir={tmp_path / 'cache'}", "metrics=[fid]",
        "num_samples=4", "batch_size=2", "seeds=[0]", "sampler=ddim", "grid.steps=2", f"reference.source={reference}",
        f"out_dir={tmp_path / 'evaluation'}", "progress=false"], config_name="evaluate"))
    assert result["protocol"]["nfe"] == 2 and result["metrics"]["fd_digits-cnn"] > 0


def test_the_imported_config_records_c_noise_and_the_source(ddpm):
    _, ckpt, model, _, _ = ddpm
    assert model.denoiser.parameterization.c_noise.func.__name__ == "ddpm_step"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["imported"]["source"].endswith("published") and saved["global_step"] == 0


def test_the_project_unet_must_be_the_one_the_config_converts_to(published, tmp_path):
    with pytest.raises(ValueError, match=r"embedding_scale 250.0.*is not the UNet this UNet2DModel converts to"):
        imported(published, tmp_path / "run", "network.embedding_scale=null", published="ddpm_cifar10_unet")
    assert no_checkpoint_written(tmp_path / "run")


# ---------------------------------------------------------------- refusals, before compute


def no_checkpoint_written(run_dir):
    return not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


def test_a_hub_id_offline_fails_fast_naming_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"offline.*source=/path/to/folder"):
        imported("google/ddpm-cifar10-32", tmp_path / "run", *TINY_NETWORK)
    assert time.perf_counter() - start < 20 and no_checkpoint_written(tmp_path / "run")


def test_import_needs_no_training_data(tmp_path, monkeypatch):
    """Issue 23, item 13: importing google/ddpm-cifar10-32 demanded CIFAR-10 itself (refused offline) though it only
    converts weights; the data's shape and labels come from the published config, and the run's config records the
    published data set, not a placeholder folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: CIFAR-10 is not here
    source = save_unet(tmp_path / "src", TINY)
    cfg = compose_config(["published=ddpm_cifar10", f"source={source}", *TINY_NETWORK], tmp_path / "run",
                         config_name="import_model")
    ckpt = import_model(cfg)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.data.name == "uoft-cs/cifar10" and saved.data.path is None
    assert list(saved.data_meta.shape) == [3, 32, 32] and saved.data_meta.num_classes == 0
    model, _ = load_model(ckpt)
    theirs = diffusers.UNet2DModel.from_pretrained(source).eval()
    assert torch.equal(model.denoiser.network.model.conv_in.weight, theirs.conv_in.weight)


def test_a_folder_without_weights_is_refused(tmp_path):
    source = save_unet(tmp_path / "src", TINY)
    (source / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"src has a config.json but no weights: expected one of"):
        imported(source, tmp_path / "run", *TINY_NETWORK)
    assert no_checkpoint_written(tmp_path / "run")


def test_a_missing_path_and_a_config_of_another_architecture_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither an existing folder nor a Hugging Face Hub id"):
        imported(tmp_path / "no" / "such" / "folder", tmp_path / "run", *TINY_NETWORK)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**dict(SD_VAE, block_out_channels=(8,), norm_num_groups=4, down_block_types=(
        "DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1)).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"vae/config.json describes a 'AutoencoderKL', expected a 'UNet2DModel'"):
        imported(tmp_path / "vae", tmp_path / "run", *TINY_NETWORK)
    source = save_unet(tmp_path / "wide", TINY)
    with pytest.raises(ValueError, match=r"another UNet2DModel than the network config \(block_out_channels: source "
                                         r"\[32, 32, 32, 32\] vs network.config \[128, 256, 256, 256\]"):
        imported(source, tmp_path / "run")
    assert no_checkpoint_written(tmp_path / "run")


def test_weights_whose_keys_do_not_match_are_refused_naming_the_file(tmp_path):
    source = save_unet(tmp_path / "src", TINY)
    file = source / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["conv_in.extra"] = state.pop("conv_in.weight")
    save_file(state, file)
    with pytest.raises(ValueError, match=r"src does not match DiffusersUNet .*missing \['model.conv_in.weight'\], "
                                         r"unexpected \['model.conv_in.extra'\]"):
        imported(source, tmp_path / "run", *TINY_NETWORK)
    assert no_checkpoint_written(tmp_path / "run")


def test_a_scheduler_other_than_the_process_is_refused(tmp_path):
    source = save_unet(tmp_path / "src", TINY, dict(DDPM_SCHEDULER, beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match=r"scheduler has T=1000 betas .*squaredcos_cap_v2.*set model.process"):
        imported(source, tmp_path / "run", *TINY_NETWORK)
    source = save_unet(tmp_path / "v", TINY, dict(DDPM_SCHEDULER, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match=r"predicts 'v_prediction' \(VPrediction\), but model.parameterization is "
                                         r"EpsPrediction"):
        imported(source, tmp_path / "run", *TINY_NETWORK)
    with pytest.raises(ConfigError, match=r"ddpm_step is the noise input of a discrete process"):  # the dry run's
        imported(save_unet(tmp_path / "vp", TINY), tmp_path / "run", *TINY_NETWORK, "model=score_sde")
    scaled_time = "model.parameterization.c_noise._target_=lightning_diffusion.core.parameterizations.scaled_time"
    with pytest.raises(ValueError, match=r"discrete DDPMScheduler chain, but model.process is VPSDE"):
        imported(save_unet(tmp_path / "vp", TINY), tmp_path / "run", *TINY_NETWORK, "model=score_sde", scaled_time)


def test_import_without_a_source_or_converter_is_a_config_error(tmp_path):
    cfg = compose_config(["network=diffusers_ddpm_cifar10", *TINY_NETWORK, *LOCAL_DATA], tmp_path,
                         config_name="import_model")
    with pytest.raises(ConfigError, match="import needs source="):
        import_model(cfg)


# ---------------------------------------------------------------- AutoencoderKL as a first stage


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    """(folder of a random AutoencoderKL at the SD-VAE configuration, diffusers' own model loaded from it)."""
    folder = tmp_path_factory.mktemp("sd_vae") / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**SD_VAE).save_pretrained(folder)
    return folder, diffusers.AutoencoderKL.from_pretrained(folder).eval()


def first_stage_from_config(name, folder):
    cfg = compose_config([f"first_stage={name}", f"first_stage.source={folder}", "first_stage.image_size=32"])
    return instantiate(cfg.first_stage), cfg


def test_sd_vae_first_stage_with_dit_scale_equals_diffusers(sd_vae):
    folder, vae = sd_vae
    stage, cfg = first_stage_from_config("sd_vae", folder)
    assert stage.latent_shape == (4, 4, 4) and stage.data_shape == (3, 32, 32) and cfg.first_stage.scale == 0.18215
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        torch.testing.assert_close(stage.moments(x), torch.cat([posterior.mean, posterior.logvar], 1), rtol=0, atol=0)
        z = stage.encode(x, torch.Generator().manual_seed(4))
        expected = 0.18215 * posterior.sample(torch.Generator().manual_seed(4))
        torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stage.decode(z), vae.decode(z / 0.18215).sample, rtol=1e-5, atol=1e-5)


def test_sd_vae_first_stage_with_edm2_normalisation(sd_vae):
    folder, vae = sd_vae
    stage, cfg = first_stage_from_config("sd_vae_edm2", folder)
    mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).view(1, 4, 1, 1)
    std = torch.tensor([4.17, 4.62, 3.71, 3.28]).view(1, 4, 1, 1)
    assert cfg.model.parameterization.sigma_data == 0.5
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(6))
        z = stage.encode(x, torch.Generator().manual_seed(6))
        torch.testing.assert_close(z, (raw - mean) * 0.5 / std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stage.decode(z), vae.decode(raw).sample, rtol=1e-4, atol=1e-4)


def test_the_scale_defaults_to_the_source_config_and_bad_normalisations_are_refused(sd_vae):
    folder, _ = sd_vae
    assert autoencoder_kl(folder, image_size=32).scale == pytest.approx(0.18215)
    with pytest.raises(ValueError, match=r"one number or one per latent channel \(4\), got 3"):
        autoencoder_kl(folder, image_size=32, scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"image_size=36 must be a positive multiple of its down-sampling factor 8"):
        autoencoder_kl(folder, image_size=36)
    json.loads((folder / "config.json").read_text())  # the folder is left as it was
