"""score_sde_pytorch checkpoints as their code writes them, in through `import_model`, against their own module.

tests/fixtures/score_sde_ncsnpp.json holds facts written down once from their NCSNpp (yang-song/score_sde_pytorch at
the commit it names, small configs derived from configs/subvp/cifar10_ddpmpp_continuous.py and
configs/ve/cifar10_ncsnpp_continuous.py): the state dict's key names, shapes and order (`module.sigmas` first), which
entries their ExponentialMovingAverage's `shadow_params` list covers, and the score their `get_score_fn` returned in
float64 for weights filled by a seeded rule this test recreates. The checkpoint is written as their
`utils.save_checkpoint` does: {'optimizer', 'model' (the DataParallel state dict), 'ema', 'step'}.
"""

import json
import math

import pytest
import torch

from helpers import TESTS, compose_config
from lightning_diffusion.core.denoiser import score_from_denoiser
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.convert.imported import import_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = json.loads((TESTS / "fixtures" / "score_sde_ncsnpp.json").read_text())
SMALL = ["data=digits16", "network.channels=32", "network.channel_mult=[4,4]", "network.num_blocks=1",
         "network.attn_resolutions=[8]"]  # the fixture's nf, ch_mult, num_res_blocks, attn_resolutions, 16 x 16 x 1
# SongUNet embeds c_noise in float32 (their reference is float64 throughout): 1e-6 apart; 1e-13 with float64 embeddings
CLOSE = dict(rtol=1e-5, atol=1e-5)
PUBLISHED = {"ddpmpp_cont_subvp": ["published=ddpmpp_cont_vp", "model=score_sde_subvp"],
             "ncsnpp_cont_ve": ["published=ncsnpp_cont_ve"]}


def fill(index: int, shape) -> torch.Tensor:
    """The fixture's weights: entry `index` of their state dict, seeded by it (values exact in float32)."""
    g = torch.Generator().manual_seed(1000 + index)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.1).float()


def their_checkpoint(name: str, path, raw_shift: float = 0.5):
    """A checkpoint laid out as score_sde_pytorch saves it; the EMA holds the fixture's weights, the raw model others."""
    facts = FIXTURE["models"][name]
    config = facts["config"]
    sigmas = torch.exp(torch.linspace(math.log(config["sigma_max"]), math.log(config["sigma_min"]),
                                      config["num_scales"], dtype=torch.float64)).float()  # utils.get_sigmas
    ema = {key: sigmas if key == "module.sigmas" else fill(i, shape) for i, (key, shape) in enumerate(facts["keys"])}
    averaged = facts["shadow_params"]["keys"]
    assert len(averaged) == facts["shadow_params"]["count"] and "module.sigmas" in facts["shadow_params"]["left_out"]
    model = {key: v + raw_shift if key in averaged else v for key, v in ema.items()}  # training weights, not the EMA
    shadow = [ema[key] for key in averaged]  # positional, as net.parameters() with requires_grad
    optimizer = torch.optim.Adam([torch.nn.Parameter(t.clone()) for t in shadow], lr=2e-4, eps=1e-8)
    torch.save({"optimizer": optimizer.state_dict(), "model": model,
                "ema": {"decay": config["ema_rate"], "num_updates": 10, "shadow_params": shadow}, "step": 10}, path)
    return path


def imported_checkpoint(name: str, tmp_path):
    """Their checkpoint of `name` through `import_model` (the published config at the fixture's size)."""
    source = their_checkpoint(name, tmp_path / "checkpoint_1.pth")
    cfg = compose_config([*PUBLISHED[name], *SMALL, f"source={source}"], tmp_path / "run", config_name="import_model")
    return import_model(cfg)


def imported_model(name: str, tmp_path):
    model, _ = load_model(imported_checkpoint(name, tmp_path))
    return model.double().eval()


def fixture_x() -> torch.Tensor:
    return torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_the_fixture_is_their_layout():
    """Their files start with `module.sigmas` (NCSNpp's buffer), which their EMA list leaves out with the Fourier W."""
    subvp, ve = FIXTURE["models"]["ddpmpp_cont_subvp"], FIXTURE["models"]["ncsnpp_cont_ve"]
    assert subvp["keys"][0] == ["module.sigmas", [1000]] == ve["keys"][0]
    assert subvp["shadow_params"]["left_out"] == ["module.sigmas"]
    assert ve["shadow_params"]["left_out"] == ["module.sigmas", "module.all_modules.0.W"]
    assert (subvp["config"]["centered"], ve["config"]["centered"], ve["config"]["scale_by_sigma"]) == (True, False, True)


def test_a_subvp_checkpoint_of_theirs_gives_their_score(tmp_path):
    """Defect 2 (`module.sigmas` broke the import) and 4 (x_t must be read unscaled): their score, float32 embedding
aside."""
    model = imported_model("ddpmpp_cont_subvp", tmp_path)
    process, x = model.process, fixture_x()
    with torch.no_grad():
        for reference in FIXTURE["models"]["ddpmpp_cont_subvp"]["outputs"]:
            t = torch.tensor(reference["t"], dtype=torch.float64)
            score = score_from_denoiser(x, model.denoiser(x, t), process.alpha(t), process.sigma(t))
            theirs = torch.tensor(reference["score"], dtype=torch.float64).reshape(x.shape)
            torch.testing.assert_close(score, theirs, **CLOSE)


def test_a_subvp_score_is_score_sde_pytorchs_formula(tmp_path):
    """Defect 4: score = -F(x_t, 999 t) / std with std = 1 - exp(-int_0^t beta), F reading x_t unscaled (their
    models/utils.py get_score_fn and sde_lib.subVPSDE.marginal_prob), at t = 0.1 .. 0.5."""
    model = imported_model("ddpmpp_cont_subvp", tmp_path)
    x = fixture_x()
    with torch.no_grad():
        for t in (0.1, 0.2, 0.3, 0.4, 0.5):
            tt = torch.full((2,), t, dtype=torch.float64)
            integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2  # int_0^t beta(s) ds, beta from 0.1 to 20
            std = 1 - math.exp(-integral)
            by_hand = -model.denoiser.network(x, 999 * tt, None) / std
            process = model.process
            score = score_from_denoiser(x, model.denoiser(x, tt), process.alpha(tt), process.sigma(tt))
            torch.testing.assert_close(score, by_hand, rtol=1e-9, atol=1e-10)


def test_a_ve_checkpoint_of_theirs_gives_their_score_on_data_in_0_1(tmp_path):
    """Defects 2 and 3: NCSN++ (VE) on their [0, 1] data. x' in their space is x = 2 x' - 1 in ours at the same t
    (sigma = 2 sigma'), and their score is twice ours."""
    model = imported_model("ncsnpp_cont_ve", tmp_path)
    process, x_theirs = model.process, fixture_x()
    x = 2 * x_theirs - 1
    with torch.no_grad():
        for reference in FIXTURE["models"]["ncsnpp_cont_ve"]["outputs"]:
            t = torch.tensor(reference["t"], dtype=torch.float64)
            score = score_from_denoiser(x, model.denoiser(x, t), process.alpha(t), process.sigma(t))
            theirs = torch.tensor(reference["score"], dtype=torch.float64).reshape(x.shape)
            torch.testing.assert_close(2 * score, theirs, **CLOSE)


def test_their_raw_weights_are_read_with_ema_false(tmp_path):
    """ema=false reads `model` (here the EMA's weights + 0.5), skipping `sigmas` as the EMA placement does."""
    source = their_checkpoint("ddpmpp_cont_subvp", tmp_path / "c.pth")
    cfg = compose_config([*PUBLISHED["ddpmpp_cont_subvp"], *SMALL, f"source={source}", "weights.ema=false"],
                         tmp_path / "run", config_name="import_model")
    model, _ = load_model(import_model(cfg))
    first = FIXTURE["models"]["ddpmpp_cont_subvp"]["keys"][1]  # all_modules.0.weight: the time embedding's Linear
    torch.testing.assert_close(model.denoiser.network.emb.mlp[0].weight, fill(1, first[1]) + 0.5)
