"""Denoiser transforms chosen at sampling: the published DDPM samples as Ho et al. did (x0 clipped to [-1, 1]), a run
records its transforms, and `sample` takes others (transforms=[...], [] for none), naming its files by them."""

import numpy as np
import pytest
from hydra.utils import instantiate

from helpers import compose_config
from lightning_diffusion.core.transforms import clip_x0
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.sample import sample
from test_score_sde_checkpoints import imported_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CLIP = "transforms=[{_target_:lightning_diffusion.core.transforms.clip_x0,_partial_:true}]"


@pytest.mark.parametrize("published", ["ddpm_cifar10", "ddpm_cifar10_unet"])
def test_the_published_ddpm_clips_x0_as_its_authors_sampled(published, tmp_path):
    cfg = compose_config([f"published={published}", "data=digits16"], tmp_path, config_name="import_model")
    (transform,) = instantiate(cfg.model.transforms)  # what the built model samples with
    assert transform.func is clip_x0 and transform.keywords == {"limit": 1.0}


def test_sample_applies_and_names_the_transforms(tmp_path):
    ckpt = imported_checkpoint("ddpmpp_cont_subvp", tmp_path)  # score-SDE: the run itself clips nothing
    common = [f"ckpt_path={ckpt}", "n=4", "sampler=ddim", "grid.steps=3", "progress=false", "device=cpu"]
    paths = {}
    for name, extra in {"run": [], "clip": [CLIP], "none": ["transforms=[]"]}.items():
        cfg = compose_config([*common, f"out_dir={tmp_path / name}", *extra], config_name="sample")
        paths[name] = sample(cfg)
    samples = {name: np.load(path)["samples"] for name, path in paths.items()}
    assert np.abs(samples["clip"]).max() < 1.001 < np.abs(samples["none"]).max()  # DDIM ends at t_min: ~D
    np.testing.assert_array_equal(samples["run"], samples["none"])
    assert paths["run"].name == paths["none"].name != paths["clip"].name  # the transform is in the hash


@pytest.mark.parametrize("bad, message", [
    ("transforms=[3]", r"transforms=\[3\] must be a list of denoiser transforms"),
    ("transforms=[{_target_:lightning_diffusion.core.transforms.clip_x0,_partial_:true,limit:0}]",
     r"clip_x0 needs a finite limit > 0, got limit=0")])
def test_bad_transforms_are_refused_at_build(bad, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(compose_config(["logger=csv", bad], tmp_path))
