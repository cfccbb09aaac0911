"""score_sde_pytorch checkpoints in, as runs of ours, and NVlabs/edm pickles never run (EDM's exports in EDM's own
layout: test_edm_exports.py).

The published files are faked from a network of ours written in their layout (score_sde: `module.` keys, the EMA
as a positional list over the trainable parameters), so the round trip is exact: the imported run's D(x, t) is
that of the network holding the EMA weights.
"""

import pickle

import pytest
import torch

from helpers import compose_config
from lightning_diffusion.core.denoiser import Denoiser
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.checkpoints import init_from, load_model
from lightning_diffusion.lightning.convert.edm import FORMAT
from lightning_diffusion.lightning.convert.imported import import_model

pytestmark = pytest.mark.usefixtures("one_thread")

NETWORK = ["data=digits", "network=unet_tiny", "network.channels=16", "network.embedding=fourier"]
SCORE_SDE = [*NETWORK, "model=score_sde", "conditional=false", "model.num_classes=0", "model.guidance_scale=1.0",
             "+weights._target_=lightning_diffusion.lightning.convert.score_sde.score_sde_weights",
             "+weights._partial_=true"]
EDM = [*NETWORK, "model=edm", "+weights._target_=lightning_diffusion.lightning.convert.edm.edm_weights",
       "+weights._partial_=true"]


def import_cfg(overrides, source, run_dir):
    return compose_config([*overrides, f"+source={source}"], run_dir, config_name="import_model")


def published_network(overrides, tmp_path):
    """The network the config builds, with random non-zero weights (ours zero-initialise the output layers)."""
    _, model, _ = build(compose_config(overrides, tmp_path / "build"))
    network = model.denoiser.network
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    return network


def fake_score_sde(network, path, shift=0.01):
    """Their utils.save_checkpoint layout: DataParallel keys, EMA = shifted copies, positional over parameters()."""
    shadow = [p.detach() + shift for p in network.parameters() if p.requires_grad]
    torch.save({"model": {f"module.{k}": v for k, v in network.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 5, "shadow_params": shadow},
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "step": 7}, path)
    return path, shadow


def denoised(model, x, t, labels=None):
    with torch.no_grad():
        return model.denoiser(x, t, labels)


def test_a_score_sde_checkpoint_round_trips_with_its_ema_weights(tmp_path):
    network = published_network(SCORE_SDE, tmp_path)
    source, shadow = fake_score_sde(network, tmp_path / "checkpoint_8.pth")
    ckpt = import_model(import_cfg(SCORE_SDE, source, tmp_path / "run"))
    model, _ = load_model(ckpt)
    imported = dict(model.denoiser.network.named_parameters())
    trainable = [n for n, p in network.named_parameters() if p.requires_grad]
    assert len(trainable) == len(shadow) and "emb.features.freqs" not in imported  # the Fourier buffer is no parameter
    for name, tensor in zip(trainable, shadow):
        assert torch.equal(imported[name], tensor), name
    assert torch.equal(model.denoiser.network.emb.features.freqs, network.emb.features.freqs)
    # D of the imported run = D of their network holding its EMA weights, under the same process and parameterization
    for p, s in zip((p for p in network.parameters() if p.requires_grad), shadow):
        p.data.copy_(s)
    reference = Denoiser(network, model.denoiser.parameterization, model.process)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(denoised(model, x, t), reference(x, t), rtol=0, atol=0)


def test_the_raw_weights_and_training_from_an_import(tmp_path):
    network = published_network(SCORE_SDE, tmp_path)
    source, _ = fake_score_sde(network, tmp_path / "checkpoint.pth")
    ckpt = import_model(import_cfg([*SCORE_SDE, "+weights.ema=false"], source, tmp_path / "run"))
    model, _ = load_model(ckpt)
    for (name, p), q in zip(model.denoiser.network.state_dict().items(), network.state_dict().values()):
        assert torch.equal(p, q), name
    cfg = compose_config([*SCORE_SDE, f"init_from={tmp_path / 'run'}"], tmp_path / "fresh")
    _, fresh, _ = build(cfg)
    init_from(fresh, cfg)  # what train does before fitting
    assert torch.equal(fresh.denoiser.network.conv_in.weight, network.conv_in.weight)
    cfg.init_from = str(tmp_path / "none.ckpt")
    with pytest.raises(FileNotFoundError, match="init_from=.*does not exist"):
        init_from(fresh, cfg)


def test_bad_score_sde_checkpoints_are_refused_naming_the_file(tmp_path):
    network = published_network(SCORE_SDE, tmp_path)
    source, shadow = fake_score_sde(network, tmp_path / "c.pth")
    saved = torch.load(source, weights_only=True)
    cases = {
        "short_ema": ({**saved, "ema": {**saved["ema"], "shadow_params": shadow[:-1]}},
                      r"c.pth: ema.shadow_params has \d+ tensors, but the model has \d+ trainable entries"),
        "swapped": ({**saved, "ema": {**saved["ema"], "shadow_params": shadow[1:2] + shadow[:1] + shadow[2:]}},
                    r"the EMA tensor placed on .* has shape"),
        "no_prefix": ({**saved, "model": {k.removeprefix("module."): v for k, v in saved["model"].items()}},
                      r"'model' keys should all start with 'module.'"),
        "no_model": ({"state_dict": saved["model"]}, r"not a score_sde_pytorch checkpoint: expected a dict with 'model'"),
    }
    for name, (checkpoint, error) in cases.items():
        torch.save(checkpoint, tmp_path / "c.pth")
        with pytest.raises(ValueError, match=error):
            import_model(import_cfg(SCORE_SDE, tmp_path / "c.pth", tmp_path / name))
        assert not (tmp_path / name / "checkpoints").exists(), name
    fake_score_sde(network, source)
    mismatch = r"c.pth does not match UNet .*shape mismatches \['emb.features.freqs: \(8,\) != \(16,\)"
    with pytest.raises(ValueError, match=mismatch):
        import_model(import_cfg([*SCORE_SDE, "network.channels=32"], source, tmp_path / "wider"))


class Payload:
    """What a malicious (or merely code-carrying) pickle does when loaded: here, write a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_in_a_pickle_is_never_run(tmp_path):
    """An EDM .pkl is refused unread; a file of tensors with code inside is refused by the weights-only load."""
    marker = tmp_path / "code_ran"
    with open(tmp_path / "edm-cifar10.pkl", "wb") as f:
        pickle.dump({"ema": Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"is an EDM pickle, which runs embedded code .* export its state dict"):
        import_model(import_cfg(EDM, tmp_path / "edm-cifar10.pkl", tmp_path / "run"))
    torch.save({"format": FORMAT, "precond": "EDMPrecond", "init_kwargs": {}, "state_dict": Payload(marker)},
               tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"cannot be read as weights only .* never unpickles code"):
        import_model(import_cfg(EDM, tmp_path / "code.pt", tmp_path / "run"))
    assert not marker.exists()
