"""NVlabs/edm exports in, as EDM's own code writes them (lightning/convert/edm.py; issue 23, items 1 and 3).

tests/fixtures/edm_exports.json holds facts written down once from NVlabs/edm 008a4e5 (training/networks.py, run in
a scratch folder, never copied here): for six small networks (SongUNet as DDPM++ and NCSN++ under EDMPrecond,
VPPrecond and VEPrecond; DhariwalUNet under EDMPrecond and iDDPMPrecond) the precond, its init_kwargs, every
state-dict key with its shape, the buffers EDM computes itself (resampling filters, iDDPM's table `u`), and EDM's own
D(x; sigma) in float64 on fixed inputs with every parameter filled by `fill` (a hash of the key and index). Each test
writes the export file EDM's recipe writes, imports it through `import_model` and compares our D with EDM's.
"""

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from helpers import compose_config
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.convert.edm import FORMAT
from lightning_diffusion.lightning.convert.imported import import_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "edm_exports.json"
SMALL_SONG = ["data=digits", "network.channels=64", "network.channel_mult=[1,2]", "network.num_blocks=2",
              "network.attn_resolutions=[4]"]
SMALL_ADM = ["data=digits", "data.image_size=8", "network.channels=32", "network.channel_mult=[2,4]",
             "network.num_blocks=2", "network.attn_resolutions=[4]"]
# each fixture export -> the published config (made small as the export) it imports under
CONFIGS = {
    "edm_ddpmpp": ["published=edm_cifar10_vp", *SMALL_SONG],
    "edm_ncsnpp": ["published=edm_cifar10_ve", *SMALL_SONG],
    "vp_ddpmpp": ["published=edm_baseline_cifar10_vp", *SMALL_SONG],
    "ve_ncsnpp": ["published=edm_baseline_cifar10_ve", *SMALL_SONG, "network.encoder=skip", "network.decoder=skip"],
    "edm_adm": ["published=edm_imagenet64_adm", *SMALL_ADM, "network.augment_dim=9"],
    "iddpm_adm": ["published=edm_baseline_imagenet64_adm", *SMALL_ADM],
}


def fill(key: str, shape) -> torch.Tensor:
    """Every exported parameter (and Fourier frequency) from its EDM key alone: murmur3's finaliser of (key, flat
    index) as uniform noise of unit variance, scaled by 1 / sqrt(fan-in), in float32 as EDM's files are."""
    n, mask = math.prod(shape), 0xFFFFFFFF
    h = (torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + zlib.crc32(key.encode())) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * multiplier) & mask  # int64 products wrap; the low 32 bits are exact
    uniform = (h ^ (h >> 16)).to(torch.float64) / 2**32
    scale = 1 / math.sqrt(n // shape[0]) if len(shape) > 1 else 0.5
    return (scale * math.sqrt(3) * (2 * uniform - 1)).reshape(shape).float()


def inputs(reference: dict, channels: int, resolution: int):
    """The fixed inputs EDM's D was evaluated on: x~ (in EDM's scaled space), sigma, labels (None: no label),
    augmentation labels."""
    sigma = torch.tensor(reference["sigma"], dtype=torch.float64)
    k = torch.arange(channels * resolution**2, dtype=torch.float64)
    x = torch.stack([(1 + s) * torch.sin(0.37 * k + 0.3 + b) for b, s in enumerate(sigma.tolist())])
    augment = reference.get("augment_dim", 0)
    a = 0.5 * torch.sin(1.3 * torch.arange(len(sigma) * augment, dtype=torch.float64) + 0.2)
    return (x.reshape(len(sigma), channels, resolution, resolution), sigma, reference["labels"],
            a.reshape(len(sigma), augment) if augment else None)


def write_export(spec: dict, path: Path, state=None) -> Path:
    """The file EDM's recipe writes (convert/edm.py's docstring), for the fixture's network filled by `fill`."""
    if state is None:
        state = {key: torch.tensor(spec["buffers"][key], dtype=torch.float32).reshape(shape)
                 if key in spec["buffers"] else fill(key, shape) for key, shape in spec["state_dict"]}
    torch.save({"format": FORMAT, "precond": spec["precond"], "init_kwargs": spec["init_kwargs"],
                "state_dict": state}, path)
    return path


def load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def imported(name: str, tmp_path: Path, spec: dict, extra=(), state=None):
    source = write_export(spec, tmp_path / f"{name}.pt", state)
    cfg = compose_config([*CONFIGS[name], *extra, f"source={source}"], tmp_path / "run", config_name="import_model")
    return load_model(import_model(cfg))[0]


def edm_denoised(model, spec: dict) -> torch.Tensor:
    """Our D at EDM's inputs, in float64: x_t = alpha x~ at the time whose sigma~ is EDM's sigma."""
    kw, process = spec["init_kwargs"], model.process
    x, sigma, labels, augment = inputs(spec["reference"], kw["img_channels"], kw["img_resolution"])
    t = process.t_of_sigma_tilde(sigma)
    y = None if labels is None else torch.tensor([model.num_classes if c is None else c for c in labels])
    with torch.no_grad():
        out = model.denoiser.double()(process.alpha(t)[:, None, None, None] * x, t, y, augment)
    return getattr(out, "denoised", out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_edm_export_comes_in_as_edm_computes_it(name, tmp_path):
    """Items 1 and 3: EDM's key names and shapes, written as EDM's recipe writes them, import through the published
    config and give EDM's own D(x; sigma) in float64 (to 1e-15; 1e-9 where SongUNet's label map (weight, bias) is
    merged into one float32 table), where a wrong qkv order, label merge or c_noise moves it by 1e-3 or more."""
    spec = load_fixture()["exports"][name]
    model = imported(name, tmp_path, spec)
    reference = spec["reference"]
    denoised = edm_denoised(model, spec)
    torch.testing.assert_close(denoised.flatten()[reference["indices"]],
                               torch.tensor(reference["values"], dtype=torch.float64), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(denoised.flatten(1).norm(dim=1),
                               torch.tensor(reference["sample_norms"], dtype=torch.float64), rtol=1e-8, atol=0)


NETWORK_NEEDED = r"the config must build it: .*, with network.channels=64 network.channel_mult=\[1,2\] network.num_blocks=2"
REFUSALS = {  # (export, overrides of the matching config) -> what the refusal names
    "another depth": ("edm_ddpmpp", ["network.num_blocks=1"],
                      r"EDM's model.enc.4x4_down.conv0.weight \(64, 64, 3, 3\) lands on the network's "
                      rf"down.2.0.conv1.weight \(128, 64, 3, 3\).*{NETWORK_NEEDED}"),
    "other channels": ("edm_ncsnpp", ["network.channels=32"],
                       rf"EDM's model.map_noise.freqs \(64,\) lands on the network's emb.features.freqs \(32,\).*"
                       rf"{NETWORK_NEEDED}.*network.embedding=fourier network.channel_mult_noise=2 "
                       r"network.encoder=residual network.decoder=standard network.resample_filter=\[1,3,3,1\]"),
    "another encoder": ("edm_ncsnpp", ["network.encoder=skip"],
                        r"missing \['pyramid_in.0.conv.weight', 'pyramid_in.0.conv.bias'\], unexpected "
                        r"\['pyramid_in.0.conv.conv.weight'.*network.encoder=residual"),
    "another filter": ("edm_ddpmpp", ["network.resample_filter=[1,3,3,1]"],
                       r"EDM's enc.4x4_down.conv0.resample_filter resamples with the filter of taps \[1, 1\], the "
                       r"network another: network.resample_filter=\[1, 1\]"),
    "other heads": ("edm_adm", ["network.channels_per_head=32"],
                    r"the network's down.3.1 has 4 heads, EDM's 2 \(ADM: network.channels_per_head=64\)"),
    "no labels": ("edm_adm", ["conditional=false"], r"label_dim=10 but the network has num_classes=0: conditional=true"),
    "VE read with c_in of unit variance": ("ve_ncsnpp", ["~model.parameterization.c_in"],
                                           r"trained with VEPrecond: expected model=score_sde_ve \(VESDE sigma_min=0.02, "
                                           r"sigma_max=100.0\).* c_in unscaled.*the model's c_in is 0.99"),
    "VE beyond its sigma_max": ("ve_ncsnpp", ["model.process.sigma_max=150"], r"the model's noise levels "
                                r"0.0200\d*..150 leave the VEPrecond network's 0.02..100: expected model=score_sde_ve"),
    "iDDPM on linear betas": ("iddpm_adm", ["model.process.schedule._target_=lightning_diffusion.core.processes."
                                            "linear_betas", "~model.process.s", "~model.process.max_beta"],
                              r"trained with iDDPMPrecond: expected model=ddpm on cosine_betas \(T=1000, s=0.008, "
                              r"max_beta=0.999\).*the model's c_noise"),
    "iDDPM read at the integer step": ("iddpm_adm", ["model.parameterization.c_noise._target_=lightning_diffusion.core."
                                                     "parameterizations.ddpm_step"], r"c_noise nearest_ddpm_step"),
    "EDM with another sigma_data": ("edm_ddpmpp", ["model.parameterization.sigma_data=1.0"],
                                    r"expected model=edm with model.parameterization.sigma_data=0.5"),
    "VP read as EDM": ("vp_ddpmpp", ["model=edm"], r"trained with VPPrecond: expected model=score_sde \(VPSDE "
                       r"beta_min=0.1, beta_max=20.0, t_min=1e-05\), eps-prediction, c_noise scaled_time with "
                       r"scale=999.*the model's c_skip is 0.999984 at sigma=0.002, EDM's 1"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_an_export_of_another_config_is_refused_naming_what_differs(case, tmp_path):
    """A wrong-config export is refused before anything is computed or written, naming EDM's key (or coefficient)
    that differs and the config the export needs."""
    name, overrides, error = REFUSALS[case]
    with pytest.raises(ValueError, match=error):
        imported(name, tmp_path, load_fixture()["exports"][name], overrides)
    assert not (tmp_path / "run" / "checkpoints").exists()
