"""Numeric guards: a non-finite loss stops the run naming the step and the good checkpoint, or is skipped and counted."""

import pytest
import torch

from helpers import FAST, compose_config
from lightning_diffusion.train import build

TOY = FAST + ["data=moons", "network=mlp", "trainer.max_steps=6", "trainer.val_check_interval=6"]


def poison_from(model, call: int):
    """Make the network return NaN from its `call`-th training evaluation on."""
    network, calls = model.denoiser.network, {"n": 0}
    forward = network.forward

    def poisoned(x, c_noise, labels=None):
        calls["n"] += torch.is_grad_enabled()
        out = forward(x, c_noise, labels)
        return out * float("nan") if calls["n"] >= call else out

    network.forward = poisoned


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
    datamodule, model, trainer = build(compose_config(TOY, tmp_path))
    poison_from(model, 4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3; the last good checkpoint is .*last.ckpt"):
        trainer.fit(model, datamodule=datamodule)
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert good["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path):
    datamodule, model, trainer = build(compose_config(TOY + ["model.nonfinite=skip", "callbacks.final_samples=null"],
                                                      tmp_path))
    poison_from(model, 4)
    trainer.fit(model, datamodule=datamodule)
    assert model.skipped_steps >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_nonfinite_policy_is_refused(tmp_path):
    with pytest.raises(Exception, match="nonfinite must be 'stop' or 'skip', got 'ignore'"):
        build(compose_config(["data=moons", "network=mlp", "model.nonfinite=ignore"], tmp_path))
