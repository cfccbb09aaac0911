"""Each paper's network at its published config (conf/network) has the parameter count its reference has.

The counts were measured by instantiating the references' own configs: EDM's training/networks.py with train.py's
`ddpmpp` / `ncsnpp` (CIFAR-10, config F: class-conditional, augment_dim 9) and `adm` (ImageNet-64, 1000 classes),
score_sde_pytorch's NCSNpp with configs/vp/cifar10_ddpmpp(_deep)_continuous.py and
configs/ve/cifar10_ncsnpp(_deep)_continuous.py. Built on the meta device: no memory, no time.
"""

import pytest
import torch
from hydra.utils import instantiate

from network_configs import count, network_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable

# config -> (data shape, classes, millions of parameters in the reference, to 0.01M)
PAPERS = {
    "unet_ddpm_cifar10": ((3, 32, 32), 0, 35.75),        # Ho et al. 2020 (35,746,307 = diffusers', exactly)
    "ddpmpp_edm_cifar10": ((3, 32, 32), 10, 55.74),      # EDM, config F
    "ncsnpp_edm_cifar10": ((3, 32, 32), 10, 56.40),      # EDM
    "ddpmpp_cont_cifar10": ((3, 32, 32), 0, 61.80),      # Song et al. 2021, Table 3
    "ddpmpp_deep_cont_cifar10": ((3, 32, 32), 0, 106.63),
    "ncsnpp_cont_cifar10": ((3, 32, 32), 0, 62.76),
    "ncsnpp_deep_cont_cifar10": ((3, 32, 32), 0, 107.59),
    "adm_imagenet64": ((3, 64, 64), 1000, 295.90),       # Dhariwal & Nichol 2021 as EDM trains it
}


def build(name, num_classes=None):
    shape, classes, _ = PAPERS[name]
    with torch.device("meta"):
        return instantiate(network_config(name, shape, classes if num_classes is None else num_classes))


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_parameter_count_is_the_reference_s(name):
    assert round(count(build(name)) / 1e6, 2) == PAPERS[name][2], count(build(name))


@pytest.mark.parametrize("name, label_map", [
    ("ddpmpp_edm_cifar10", 11 * 128),      # EDM's Linear(10 -> 128) with bias = 11 rows, the null one the bias
    ("ncsnpp_edm_cifar10", 11 * 256),      # Fourier features are 256 wide
    ("adm_imagenet64", 1000 * 768),        # bias-free Linear(1000 -> 768): the null class is zero
])
def test_unconditional_differs_by_the_label_map(name, label_map):
    assert count(build(name)) - count(build(name, num_classes=0)) == label_map
