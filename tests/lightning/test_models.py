"""The shared DiffusionModel and the EMA callback, without a Trainer (one tiny fit for the EMA under a precision)."""

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_diffusion.lightning.callbacks import EMA
from lightning_diffusion.lightning.models import DiffusionModel
from lightning_diffusion.core.noise_levels import uniform_discrete
from lightning_diffusion.core.parameterizations import EpsPrediction
from lightning_diffusion.core.processes import cosine_betas, ddpm
from lightning_diffusion.core.samplers import ancestral, ddim, learned_variance, strided_times
from lightning_diffusion.core.weightings import l_simple


class ConstantV(nn.Module):
    """eps = 0 and a constant variance output v, so sampling is fully known."""

    def __init__(self, v: float, channels: int = 2):
        super().__init__()
        self.v, self.channels = v, channels
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, c_noise, labels=None):
        return torch.cat([0 * self.scale * x, torch.full_like(x, self.v)], dim=1)


GRID = functools.partial(strided_times, steps=20)
DDIM = functools.partial(ddim, eta=0.0)


def model(v: float) -> DiffusionModel:
    return DiffusionModel(ConstantV(v), ddpm(cosine_betas, T=100), EpsPrediction(), l_simple, uniform_discrete,
                          ancestral, GRID, functools.partial(torch.optim.Adam), sample_shape=(2,),
                          learned_variance=True)


def test_learned_variance_at_v_minus_one_is_the_posterior_variance():
    m = model(-1.0)
    x_learned, nfe = m.generate(256, generator=torch.Generator().manual_seed(0))
    m.denoiser.learned_variance = False  # same network, posterior variance beta~
    m.denoiser.network.forward = lambda x, c, labels=None: torch.zeros_like(x)
    x_fixed, _ = m.generate(256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_learned, x_fixed)
    assert nfe == 20  # the variance comes from the same network evaluation


def test_learned_variance_at_v_plus_one_is_beta_and_ddim_ignores_it():
    m = model(1.0)
    t, s = torch.full((3,), 50.0), torch.full((3,), 45.0)
    _, v = m.denoiser(torch.zeros(3, 2), t)  # D and v from one call
    a_t, a_s = m.process.alpha(t.double()), m.process.alpha(s.double())
    torch.testing.assert_close(learned_variance(m.process, v, 50.0, 45.0),
                               (1 - (a_t / a_s) ** 2)[:, None].expand(3, 2).float())
    x, nfe = m.generate(8, sampler=DDIM, generator=torch.Generator().manual_seed(0))
    assert nfe == 20 and torch.isfinite(x).all()


def test_label_dropout_uses_the_null_label():
    m = DiffusionModel(ConstantV(0.0), ddpm(T=10), EpsPrediction(), l_simple, uniform_discrete, ancestral, GRID,
                       torch.optim.Adam, sample_shape=(2,), num_classes=10, label_dropout=0.25)
    labels = torch.randint(0, 10, (20_000,))
    dropped = m.drop_labels(labels)
    assert set(dropped.unique().tolist()) <= set(range(11))
    assert abs(float((dropped == 10).float().mean()) - 0.25) < 0.02
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def test_bad_labels_and_arguments_are_refused():
    m = DiffusionModel(ConstantV(0.0), ddpm(T=10), EpsPrediction(), l_simple, uniform_discrete, ancestral,
                       functools.partial(strided_times, steps=5), torch.optim.Adam, sample_shape=(2,), num_classes=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        m.generate(2, labels=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="label_dropout must be a probability"):
        DiffusionModel(ConstantV(0.0), ddpm(T=10), EpsPrediction(), l_simple, uniform_discrete, ancestral, GRID,
                       torch.optim.Adam, sample_shape=(2,), label_dropout=1.5)


def test_ema_half_life_ramps_from_step_zero():
    ema = EMA(half_life_steps=500, ramp=0.1)
    # half-life min(500, 0.1 n): short at first, so the random initial weights are forgotten quickly
    assert ema.decay(10) == pytest.approx(0.5 ** (1 / 1.0))
    assert ema.decay(1000) == pytest.approx(0.5 ** (1 / 100.0))
    assert ema.decay(10**6) == pytest.approx(0.5 ** (1 / 500.0))
    assert EMA(half_life_steps=None, decay=0.9999).decay(5) == 0.9999
    with pytest.raises(ValueError, match="exactly one of half_life_steps"):
        EMA(half_life_steps=100, decay=0.99)


def test_ema_update_is_the_recurrence_it_states():
    """Through torch's AveragedModel (as Lightning's WeightAveraging drives it): first a copy, then
    avg_n = beta(n) avg_{n-1} + (1 - beta(n)) w_n with beta(n) = decay(n), n = updates so far."""
    ema = EMA(half_life_steps=3, ramp=0.5)
    net = torch.nn.Linear(3, 2)
    averaged = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=ema._average_all, use_buffers=True)
    expected = [p.detach().clone() for p in net.parameters()]
    averaged.update_parameters(net)
    for n in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        averaged.update_parameters(net)
        beta = ema.decay(n)
        expected = [beta * e + (1 - beta) * p.detach() for e, p in zip(expected, net.parameters())]
    for got, want in zip(averaged.module.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_ema_follows_the_weights_dtype_under_trainer_precision_64():
    """trainer.precision=64 converts the module after WeightAveraging copied it: the average must turn double too
    (it failed at the first update, "expected dtype float for `end` but got dtype double")."""
    ema, model = EMA(half_life_steps=2, ramp=None), BoringModel()
    trainer = L.Trainer(max_steps=2, precision="64-true", callbacks=[ema], limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model)
    assert trainer.global_step == 2 and {p.dtype for p in model.parameters()} == {torch.float64}

