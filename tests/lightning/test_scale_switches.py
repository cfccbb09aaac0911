"""The scale switches: gradient checkpointing of named blocks (same gradients, forward recomputed, same state dict)
and torch.compile of the network (same training step)."""

import copy

import pytest
import torch

from helpers import FAST, compose_config
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.lightning.models.gradient_checkpointing import checkpoint_blocks
from lightning_diffusion.networks.unet import UNet


def unet(dropout: float = 0.1) -> UNet:
    torch.manual_seed(0)
    return UNet(1, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=dropout,
                num_classes=3)


def gradients(net: UNet, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    x, c, y = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([0, 1, 2, 3])
    net.zero_grad()
    net(x, c, y).square().mean().backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def test_checkpointed_blocks_give_the_same_gradients_and_recompute_their_forward():
    """Dropout on: the recomputation replays the RNG, so the gradients are bit-identical; each block's first conv runs
    twice per step (forward, then again in backward)."""
    plain, checkpointed = unet(), unet()
    reference = gradients(plain)
    blocks = sum(type(m).__name__ in ("ResBlock", "AttnBlock") for m in plain.modules())
    assert blocks == 12 and checkpoint_blocks(checkpointed, ["ResBlock", "AttnBlock"]) == blocks
    calls = []
    checkpointed.down[0][0].conv1.register_forward_hook(lambda *args: calls.append(1))
    ours = gradients(checkpointed)
    assert len(calls) == 2
    assert all(torch.equal(reference[k], ours[k]) for k in reference)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_a_deep_copy_runs_its_own_weights():
    """The EMA's copy (a deep copy) must run its own blocks, not call back into the original's."""
    net = unet(dropout=0.0)
    checkpoint_blocks(net, ["ResBlock"])
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
    reference = unet(dropout=0.0)
    reference.load_state_dict(twin.state_dict())
    x, c, y = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 1])
    assert torch.equal(twin(x, c, y), reference(x, c, y))


def test_an_unknown_block_class_is_refused_naming_the_classes():
    with pytest.raises(ValueError, match=r"gradient_checkpointing=\['ResnetBlock'\]: UNet has no module of class "
                                         r"\['ResnetBlock'\]; its classes are \[.*'ResBlock'.*\]"):
        checkpoint_blocks(unet(), ["ResnetBlock"])


def test_the_model_switch_reaches_the_network(tmp_path):
    _, model, _ = build(compose_config(["data=digits", "++model.gradient_checkpointing=[ResBlock]"], tmp_path))
    assert "forward" in vars(model.denoiser.network.mid[0])
    with pytest.raises(ConfigError, match="no module of class"):
        build(compose_config(["data=digits", "++model.gradient_checkpointing=[Nope]"], tmp_path))


@pytest.mark.slow
def test_a_compiled_network_trains_as_the_eager_one(tmp_path):
    """model.compile_network=true: the network is compiled in place when fitting starts, and two steps give the eager
    run's weights (to float32 round-off: inductor fuses differently)."""
    overrides = FAST + ["data=moons", "network=mlp", "network.hidden=32", "trainer.max_steps=2",
                        "callbacks.sample_grid=null", "callbacks.final_samples=null", "trainer.limit_val_batches=0"]
    weights = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        datamodule, model, trainer = build(compose_config(overrides + [f"++model.compile_network={compiled}"],
                                                          tmp_path / str(compiled)))
        trainer.fit(model, datamodule=datamodule)
        assert model._compiled == compiled
        weights[compiled] = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.allclose(weights[False][k], weights[True][k], atol=1e-5) for k in weights[False])
