"""Fine-tuning from another run (`train init_from=<run dir or checkpoint>`): weights only, checked before compute.

Issue 23, item 15: `init_from=` was documented (README, conf/published) but nothing read it.
"""

import pickle

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from helpers import FAST, compose_config
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.checkpoints import init_from, save_run_config
from lightning_diffusion.lightning.errors import ConfigError
from lightning_diffusion.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["network.channels=16", "model.process.T=50", "grid.steps=5", "callbacks.sample_grid=null",
        "callbacks.final_samples=null"]


def saved_run(run_dir, *overrides):
    """A run directory as training writes it (resolved config.yaml, checkpoints/last.ckpt), without training."""
    cfg = compose_config(FAST + TINY + list(overrides), run_dir)
    _, model, _ = build(cfg)
    save_run_config(cfg, run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, run_dir / "checkpoints" / "last.ckpt")
    return model


def fresh(run_dir, *overrides):
    cfg = compose_config(FAST + TINY + list(overrides), run_dir)
    _, model, _ = build(cfg)
    return cfg, model


def test_init_from_loads_the_weights_and_refuses_another_process_shape_or_conditioning(tmp_path):
    source = saved_run(tmp_path / "a")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # weights no fresh build has
    torch.save({"state_dict": source.state_dict()}, tmp_path / "a" / "checkpoints" / "last.ckpt")
    cfg, model = fresh(tmp_path / "b", f"init_from={tmp_path / 'a'}")
    assert init_from(model, cfg) == tmp_path / "a" / "checkpoints" / "last.ckpt"
    for (name, ours), theirs in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(ours, theirs), name
    refusals = {("model.process.T=100",): r"init_from=.*another noise process: model.process=.*'T': 50.*'T': 100",
                ("conditional=false",): r"another conditioning .*data_meta.num_classes=10 there, 0 here",
                ("data=digits16", "network.attn_resolutions=[8]"):
                    r"another data shape .*data_meta.shape=\[1, 8, 8\] there, \[1, 16, 16\] here"}
    for overrides, match in refusals.items():
        cfg, model = fresh(tmp_path / "c", f"init_from={tmp_path / 'a'}", *overrides)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match=match):
            init_from(model, cfg)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_init_from_reads_weights_only_and_names_what_is_missing(tmp_path):
    saved_run(tmp_path / "a")
    cfg, model = fresh(tmp_path / "b", f"init_from={tmp_path / 'none'}")
    with pytest.raises(FileNotFoundError, match="init_from=.*none does not exist"):
        init_from(model, cfg)
    marker = tmp_path / "ran"

    class RunsCode:  # what a malicious pickle does: call a function while being read
        def __reduce__(self):
            return (marker.touch, ())

    with open(tmp_path / "a" / "checkpoints" / "last.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": RunsCode()}, f)
    with open_dict(cfg):
        cfg.init_from = str(tmp_path / "a")
    with pytest.raises(ValueError, match="holds pickled Python objects.*refused"):
        init_from(model, cfg)
    assert not marker.exists()


class FirstStepWeights(L.Callback):
    """The model's and the EMA's weights when training starts (after the EMA's set-up), for the test below."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")
        FirstStepWeights.seen = {"model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                                 "ema": {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}}


@pytest.mark.slow
def test_a_run_trained_from_another_starts_at_its_weights(tmp_path):
    """Train a tiny run, start a second from it: at its first step model and EMA hold the first run's weights."""
    train(compose_config(FAST + TINY, tmp_path / "a"))
    first = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    train(compose_config(FAST + TINY + ["trainer.max_steps=1", f"init_from={tmp_path / 'a'}",
                                        "+callbacks.first_step._target_=test_init_from.FirstStepWeights"],
                         tmp_path / "b"))
    for part in ("model", "ema"):
        seen = FirstStepWeights.seen[part]
        assert seen.keys() == first.keys()
        for name, value in first.items():
            assert torch.equal(seen[name], value), (part, name)
