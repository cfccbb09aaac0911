"""EDM's non-leaking augmentation: identity at p = 0, labels that reproduce each transform, EDM's probabilities,
zero labels at sampling, the same draws after a resume, and a network without the input refused before compute."""

import math

import pytest
import torch
from torch import nn

from helpers import FAST, compose_config
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.lightning.data.augment import SYM6, AugmentPipe, warp
from lightning_diffusion.train import train

EDM = dict(xflip=1e8, yflip=1, scale=1, rotate=1, aniso=1, translate=1)  # EDM's train.py multipliers
GEOMETRIC = ["scale", "rotate", "aniso", "translate"]


class AugmentAwareNet(nn.Module):
    """Stands in for a network with augmentation labels (`augment_dim`, `forward(..., augment_labels=None)`), as the
    networks' interface has them; records the augmentation labels of every call (None: not given = zeros)."""

    def __init__(self, channels: int, num_classes: int = 0, augment_dim: int = 9):
        super().__init__()
        self.augment_dim, self.seen = augment_dim, []
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.labels = nn.Embedding(num_classes + 1, channels) if num_classes else None
        self.augment = nn.Linear(augment_dim, channels)

    def forward(self, x, c_noise, labels=None, augment_labels=None):
        self.seen.append(None if augment_labels is None else augment_labels.detach().clone())
        h = self.conv(x) * c_noise.view(-1, 1, 1, 1).cos()
        if labels is not None:
            h = h + self.labels(labels)[:, :, None, None]
        if augment_labels is not None:
            h = h + self.augment(augment_labels)[:, :, None, None]
        return h


def smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A band-limited test image f(x, y) (periods of 10 to 40 pixels), x right and y down about the centre."""
    return torch.sin(0.35 * x + 0.2 * y + 0.3) + torch.cos(0.15 * x - 0.3 * y) + 0.5 * torch.sin(0.6 * y)


def centred_grid(size: int):
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    return x.double(), y.double()


def inverse_from_label(label: torch.Tensor, size: int) -> torch.Tensor:
    """G^-1 (3, 3) read off one label with EDM's definitions, composed as EDM's augment.py composes it.

    Written apart from `AugmentPipe.transforms`: the stretch (w cos r, w sin r) with r in (-pi/2, pi/2) is read with
    atan (not atan2), so w = label_5 / cos r.
    """
    def affine(a, b, c, d, tx=0.0, ty=0.0):
        return torch.tensor([[a, b, tx], [c, d, ty], [0, 0, 1]], dtype=torch.float64)

    def rot(phi):
        return affine(math.cos(phi), -math.sin(phi), math.sin(phi), math.cos(phi))

    label = [float(v) for v in label]
    s = 2 ** (0.2 * label[2])
    theta = math.atan2(label[4], label[3] + 1)
    r = math.atan(label[6] / label[5]) if label[5] else 0.0
    k = 2 ** (0.2 * label[5] / math.cos(r))
    tx, ty = label[7] * size * 0.125, label[8] * size * 0.125
    # EDM: G^-1 = scale^-1 . rotate2d_inv(-theta) . [R(-r) diag(1/k, k) R(r)] . translate^-1
    return (affine(1 / s, 0, 0, 1 / s) @ rot(theta) @ rot(-r) @ affine(1 / k, 0, 0, k) @ rot(r)
            @ affine(1, 0, 0, 1, -tx, -ty))


def test_sym6_is_an_orthonormal_low_pass():
    """Its double shifts are orthonormal, so 2x upsampling and decimation with it reconstruct exactly."""
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert float(h.sum()) == pytest.approx(math.sqrt(2), abs=1e-12)
    for shift in range(6):
        assert float(h[: len(h) - 2 * shift] @ h[2 * shift:]) == pytest.approx(float(shift == 0), abs=1e-11)


def test_p_zero_is_the_identity():
    x = torch.randn(64, 3, 16, 16)
    out, labels = AugmentPipe(0.0, **EDM)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and not labels.any()
    out, labels = AugmentPipe(0.12, **EDM)(x, torch.Generator().manual_seed(0))
    assert labels.shape == (64, 9) and labels.dtype == torch.float32 and not torch.equal(out, x)


def test_images_without_a_geometric_transform_are_not_resampled():
    """Flipped-only or untouched images are exact pixel copies; an identity warp reconstructs to float precision."""
    x = torch.randn(200, 3, 16, 16)
    out, labels = AugmentPipe(0.12, **EDM)(x, torch.Generator().manual_seed(1))
    still = ~labels[:, 2:].bool().any(1)
    flipped = torch.where(labels[:, 0, None, None, None] > 0, x.flip(3), x)
    flipped = torch.where(labels[:, 1, None, None, None] > 0, flipped.flip(2), flipped)
    assert still.sum() > 100 and torch.equal(out[still], flipped[still])
    identity = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    assert torch.allclose(warp(x[:4], identity), x[:4], atol=1e-4)


@pytest.mark.parametrize("name", ["xflip", "yflip"])
def test_flip_labels_are_the_flips(name):
    x = torch.randn(32, 3, 8, 8)
    out, labels = AugmentPipe(1.0, **{name: 1.0})(x, torch.Generator().manual_seed(2))
    column, dim = (0, 3) if name == "xflip" else (1, 2)
    assert 0 < labels[:, column].sum() < 32 and not labels[:, [c for c in range(9) if c != column]].any()
    for image, label, original in zip(out, labels, x):
        assert torch.equal(image, original.flip(dim - 1) if label[column] else original)


@pytest.mark.parametrize("names", [[n] for n in GEOMETRIC] + [GEOMETRIC])
def test_labels_reproduce_each_geometric_transform(names):
    """Re-applied from its label alone (EDM's definitions, `inverse_from_label`), each augmented image is the smooth
    image seen through that transform: out(p) = f(G^-1 p) wherever G^-1 p lies well inside the image."""
    size = 32
    x, y = centred_grid(size)
    images = smooth(x, y).float().expand(24, 1, size, size)
    pipe = AugmentPipe(1.0, **{n: 1.0 for n in names})
    out, labels = pipe(images, torch.Generator().manual_seed(3))
    assert labels[:, 2:].bool().any(1).all()
    checked = 0
    for image, label in zip(out, labels):
        G_inv = inverse_from_label(label, size)
        assert torch.allclose(torch.linalg.inv(pipe.transforms(label[None], size, size)[0]), G_inv, atol=1e-5)
        sx = G_inv[0, 0] * x + G_inv[0, 1] * y + G_inv[0, 2]
        sy = G_inv[1, 0] * x + G_inv[1, 1] * y + G_inv[1, 2]
        inside = (sx.abs() < size / 2 - 5) & (sy.abs() < size / 2 - 5)
        checked += int(inside.sum())
        assert torch.allclose(image[0].double()[inside], smooth(sx, sy)[inside], atol=0.03)
    assert checked > 24 * 100


def test_augmentation_ignores_autocast():
    x = torch.randn(16, 3, 16, 16)
    labels = AugmentPipe(1.0, **EDM).draw(16, torch.Generator().manual_seed(4))
    pipe = AugmentPipe(1.0, **EDM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pipe.apply(x, labels)
    assert under.dtype == torch.float32 and torch.equal(under, pipe.apply(x, labels))


def test_draws_follow_edms_probabilities():
    """p = 0.12 with EDM's multipliers: half the images x-flipped, p / 2 y-flipped, each geometric transform on p;
    at p = 1 the spreads are EDM's (log2 scale N(0, 0.2^2) via a unit label, rotation uniform over the circle)."""
    n = 20_000
    labels = AugmentPipe(0.12, **EDM).draw(n, torch.Generator().manual_seed(5))
    on = labels.bool().float().mean(0)
    # the stretch's w sin r is nonzero only where its axis was rotated too (probability 1/2)
    expected = [0.5, 0.06, 0.12, 0.12, 0.12, 0.12, 0.06, 0.12, 0.12]
    assert torch.allclose(on, torch.tensor(expected, dtype=on.dtype), atol=0.01), on
    assert torch.equal(labels[:, 7].bool(), labels[:, 8].bool())  # one draw decides both shifts
    full = AugmentPipe(1.0, **EDM).draw(n, torch.Generator().manual_seed(6))
    theta = torch.atan2(full[:, 4], full[:, 3] + 1)
    assert float(full[:, 2].std()) == pytest.approx(1.0, abs=0.03)
    assert float(theta.abs().mean()) == pytest.approx(math.pi / 2, abs=0.03)
    assert float((full[:, 5] > 0).double().mean()) == pytest.approx(0.5, abs=0.02)  # stretch sign symmetric


def test_draws_are_deterministic_under_a_generator():
    x = torch.randn(32, 3, 8, 8)
    pipe = AugmentPipe(0.5, **EDM)
    a, la = pipe(x, torch.Generator().manual_seed(7))
    b, lb = pipe(x, torch.Generator().manual_seed(7))
    c, lc = pipe(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(la, lc)


@pytest.mark.parametrize("kwargs, message", [
    (dict(p=1.5), r"p=1.5: need 0 <= p <= 1"),
    (dict(p=0.1, yflip=-1.0), r"multiplier yflip=-1.0: need >= 0"),
    (dict(p=0.1, scale_std=0.0), r"spread scale_std=0.0: need > 0"),
    (dict(p=0.1, aniso_rotate_prob=2.0), r"aniso_rotate_prob=2.0: need a probability"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentPipe(**kwargs)


def test_a_latent_model_is_refused():
    with pytest.raises(ValueError, match="warps images, but this model diffuses a first stage's latents"):
        AugmentPipe(0.1, **EDM).check_network(AugmentAwareNet(4), latent=True)


def test_augmenting_anything_but_images_is_refused():
    with pytest.raises(ValueError, match=r"image batches \(B, C, H, W\), got shape \(4, 2\)"):
        AugmentPipe(0.1, **EDM)(torch.zeros(4, 2))


# ---- the model's seam: labels to the network in training, none at sampling, the same draws after a resume ----------

STAND_IN = ["~network", "+network._target_=test_augment.AugmentAwareNet", "+network.channels=${data_meta.channels}",
            "+network.num_classes=${data_meta.num_classes}", "augment=edm", "model.augment.p=1.0", "data.hflip=false"]
DIGITS = FAST + ["data=digits", "data.batch_size=16", "trainer.max_steps=6", "trainer.val_check_interval=3",
                 "callbacks.checkpoint.every_n_train_steps=3", "callbacks.sample_grid=null",
                 "callbacks.final_samples=null",
                 "trainer.deterministic=true"] + STAND_IN


def test_a_network_without_augmentation_labels_is_refused_before_compute(tmp_path):
    with pytest.raises(ConfigError, match=r"9-dim augmentation labels, but the network UNet has augment_dim=0: use "
                                          r"a network with augment_dim=9 .* or no augmentation \(model.augment=null\)"):
        build(compose_config(["data=digits", "augment=edm"], tmp_path))


def test_the_datas_own_flips_are_refused_with_augmentation(tmp_path):
    message = r"model.augment \(augment=edm\) draws labelled x-flips, but data.hflip=true .*data.hflip=false"
    with pytest.raises(ConfigError, match=message):
        build(compose_config(["data=digits", "augment=edm", "+network.augment_dim=9", "data.hflip=true"], tmp_path))


def test_training_conditions_on_the_labels_and_sampling_on_none(tmp_path):
    """Every training call gets the (B, 9) labels the pipe drew for its batch; validation and sampling get none."""
    datamodule, model, trainer = build(compose_config(DIGITS + ["trainer.max_steps=2", "trainer.val_check_interval=2"],
                                                      tmp_path))
    net = model.denoiser.network
    net.seen.clear()  # the build's dry run
    trainer.fit(model, datamodule=datamodule)
    train_calls = [a for a in net.seen if a is not None]
    assert len(train_calls) == 2 and all(a.shape == (16, 9) and a.any() for a in train_calls)
    net.seen.clear()
    model.generate(3, labels=torch.tensor([0, 1, 2]))
    assert net.seen and all(a is None for a in net.seen)


def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path):
    """Stopped after 3 of 6 steps and resumed: the same augmentations (global RNG restored from the checkpoint), so
    bit-identical weights, as an uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_config(DIGITS, straight))
    train(compose_config(DIGITS + ["trainer.max_steps=3"], resumed))
    train(compose_config(DIGITS, resumed))
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
