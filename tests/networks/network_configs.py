"""The network configs (conf/network) as Hydra composes them (defaults lists included), against given data."""

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from helpers import CONF
from lightning_diffusion.lightning.builder import data_meta

NAMES = sorted(p.stem for p in (CONF / "network").glob("*.yaml"))
# test widths: every config with these keys runs in well under a second on the CPU
TINY = {"channels": 16, "num_blocks": 1, "num_res_blocks": 1, "channels_per_head": 16}


def network_config(name: str, shape, num_classes: int = 0, tiny: bool = False) -> DictConfig:
    """conf/network/<name>.yaml resolved against data of `shape` (the `${data_meta.*}` train.py fills in)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        network = compose(overrides=[f"+network={name}"]).network
    if tiny:
        network.merge_with({key: value for key, value in TINY.items() if key in network})
    return OmegaConf.create({"data_meta": data_meta(shape, num_classes), "network": network}).network


def data_shape(name: str) -> tuple[int, ...]:
    """The data a config is written for: 2-D toys, CIFAR-10, ImageNet-64, or the 8x8 digits."""
    if name == "mlp":
        return (2,)
    return (3, 64, 64) if "imagenet64" in name else (3, 32, 32) if "cifar10" in name else (1, 8, 8)


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def perturb(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Break the zero initialisation (last layer, residual convs, attention projections) as training would."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net
