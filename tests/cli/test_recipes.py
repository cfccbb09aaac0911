"""The paper recipes (conf/experiment/): the papers' numbers in the papers' units, their samplers' NFE, all 50,000
CIFAR-10 training images, a build at a tiny width, and the `paper:` column in `python -m lightning_diffusion.tables`."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import compose_config
from lightning_diffusion.core.samplers import generate
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.tables import main as tables

M = 1_000_000
# Each recipe as its paper states it (images, not steps; kimg as EDM's train.py): batch, learning rate, warm-up,
# EMA (half-life in images, or decay), dropout, augmentation p, duration, dataset flips, conditioning, NFE, paper FID.
EDM_CIFAR = dict(batch=512, lr=1e-3, warmup_images=10 * M, ema_images=0.5 * M, dropout=0.13, augment=0.12,
                 images=200 * M, hflip=False, nfe=35)
RECIPES = {
    "edm_cifar10": EDM_CIFAR | dict(conditional=True, fid=1.79),
    "edm_uncond_cifar10": EDM_CIFAR | dict(conditional=False, fid=1.97),
    "edm_ve_cifar10": EDM_CIFAR | dict(conditional=True, fid=1.79),
    "edm_ve_uncond_cifar10": EDM_CIFAR | dict(conditional=False, fid=1.98),
    "edm_adm_imagenet64": dict(batch=4096, lr=1e-4, warmup_images=10 * M, ema_images=50 * M, dropout=0.1,
                               augment=None, images=2500 * M, hflip=False, conditional=True, nfe=511, fid=1.36),
    "ddpm_cifar10": dict(batch=128, lr=2e-4, warmup_steps=5000, decay=0.9999, dropout=0.1, augment=None,
                         steps=800_000, hflip=True, conditional=False, nfe=1000, fid=3.17),
    "score_sde_vp_cifar10": dict(batch=128, lr=2e-4, warmup_steps=5000, decay=0.9999, dropout=0.1, augment=None,
                                 steps=1_300_000, hflip=True, conditional=False, nfe=None, fid=3.69),
    "score_sde_subvp_cifar10": dict(batch=128, lr=2e-4, warmup_steps=5000, decay=0.9999, dropout=0.1,
                                    augment=None, steps=1_300_000, hflip=True, conditional=False, nfe=None, fid=3.56),
    # P1000 + C1000: a reverse-diffusion step and a Langevin step per level
    "score_sde_ncsnpp_ve_cifar10": dict(batch=128, lr=2e-4, warmup_steps=5000, decay=0.999, dropout=0.1,
                                        augment=None, steps=1_300_000, hflip=True, conditional=False, nfe=2000,
                                        fid=2.38),
    "score_sde_ddpmpp_deep_subvp_cifar10": dict(batch=128, lr=2e-4, warmup_steps=5000, decay=0.9999, dropout=0.1,
                                                augment=None, steps=950_000, hflip=True, conditional=False,
                                                nfe=1000, fid=2.41),
}
# The networks' width keys at a CPU size, two levels with attention at the lower one
TINY = {
    "unet_ddpm_cifar10": ["network.channels=16", "network.channel_mult=[1,2]", "network.num_res_blocks=1"],
    "song_unet": ["network.channels=16", "network.channel_mult=[1,2]", "network.num_blocks=1"],
    "adm": ["network.channels=16", "network.channel_mult=[1,2]", "network.num_blocks=1", "network.channels_per_head=16"],
}
DDPM_UNET = ("ddpm_cifar10", "score_sde_vp_cifar10", "score_sde_subvp_cifar10")


def tiny(recipe: str) -> list[str]:
    size = 64 if "imagenet" in recipe else 32
    width = TINY["unet_ddpm_cifar10" if recipe in DDPM_UNET else "adm" if "adm" in recipe else "song_unet"]
    return width + [f"network.attn_resolutions=[{size // 2}]"]


def image_folder(root, size: int, classes: int, per_class: int):
    """A folder of random PNGs in class sub-folders (a CIFAR-10 / ImageNet stand-in)."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {32: image_folder(root / "cifar", 32, 10, 10), 64: image_folder(root / "imagenet", 64, 3, 2)}


def recipe_config(recipe: str, folders, run_dir, *extra: str):
    size = 64 if "imagenet" in recipe else 32
    return compose_config([f"experiment={recipe}", "logger=csv", "data.name=null", f"data.path={folders[size]}",
                           "data.image_column=image",
                           *extra], run_dir)


def test_every_experiment_file_is_a_recipe_here():
    from helpers import CONF
    present = {p.stem for p in (CONF / "experiment").glob("*.yaml")} - {"autoencoder"}
    assert present == set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_holds_the_papers_numbers(recipe, folders, tmp_path):
    """Steps are the paper's images over its batch (to within one step), the rest as stated."""
    cfg, paper = recipe_config(recipe, folders, tmp_path), RECIPES[recipe]
    batch = cfg.data.batch_size
    assert batch == paper["batch"] and cfg.model.optimizer.lr == paper["lr"]
    assert cfg.network.dropout == paper["dropout"] and cfg.conditional == paper["conditional"]
    assert cfg.data.hflip == paper["hflip"] and cfg.data.val_fraction == 0 and cfg.trainer.limit_val_batches == 0
    assert (cfg.model.get("augment") or {}).get("p") == paper["augment"]
    if "images" in paper:  # EDM counts images
        assert abs(cfg.trainer.max_steps * batch - paper["images"]) < batch
        assert abs(cfg.model.lr_warmup_steps * batch - paper["warmup_images"]) < batch
        assert abs(cfg.callbacks.ema.half_life_steps * batch - paper["ema_images"]) < batch
        assert cfg.callbacks.ema.ramp == 0.05 and cfg.trainer.gradient_clip_val is None
    else:  # DDPM and score-SDE count iterations
        assert cfg.trainer.max_steps == paper["steps"] and cfg.model.lr_warmup_steps == paper["warmup_steps"]
        assert cfg.callbacks.ema.decay == paper["decay"]
    assert cfg.paper.fid == paper["fid"] and cfg.paper.source
    if recipe.startswith("edm"):
        assert cfg.guidance_scale == 1.0 and cfg.model.label_dropout == 0.0


@pytest.mark.parametrize("recipe", [r for r in RECIPES if RECIPES[r]["nfe"]])
def test_recipe_samples_with_the_papers_nfe(recipe, folders, tmp_path):
    """The recipe's sampler on its grid and process costs the paper's network evaluations (a stand-in D = 0)."""
    cfg = recipe_config(recipe, folders, tmp_path)
    sampler, grid, process = instantiate(cfg.sampler), instantiate(cfg.grid), instantiate(cfg.model.process)
    _, nfe = generate(sampler, grid, lambda x, t, *args: torch.zeros_like(x), process, (1, 1, 2, 2),
                      generator=torch.Generator().manual_seed(0))
    assert nfe == RECIPES[recipe]["nfe"]


@pytest.mark.parametrize("recipe", ["edm_cifar10", "ddpm_cifar10", "score_sde_ncsnpp_ve_cifar10"])
def test_cifar10_recipes_train_on_every_training_image(recipe, folders, tmp_path):
    """No validation share is taken out of the training set: every image trains and is in the FID reference."""
    datamodule = instantiate(recipe_config(recipe, folders, tmp_path).data)
    assert len(datamodule.train_tensor()) == 100 and len(datamodule.val_dataloader()) == 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_at_a_tiny_width(recipe, folders, tmp_path):
    """Composes and passes the builder's checks, its own network included (needs the networks branch's configs)."""
    cfg, paper = recipe_config(recipe, folders, tmp_path, *tiny(recipe)), RECIPES[recipe]
    max_steps = cfg.trainer.max_steps
    _, model, trainer = build(cfg)
    assert model.num_classes == ((3 if "imagenet" in recipe else 10) if paper["conditional"] else 0)
    assert (model.augment is not None) == bool(paper["augment"]) and trainer.max_steps == max_steps


def test_tables_show_every_recipes_paper_column(folders, tmp_path, capsys):
    runs = tmp_path / "runs"
    for recipe in RECIPES:
        run = runs / recipe
        run.mkdir(parents=True)
        OmegaConf.save(recipe_config(recipe, folders, run), run / "config.yaml")
        (run / "metrics.json").write_text(json.dumps({"fid": 9.99}))
    tables([str(runs), "--rows", "paper.source", "--metric", "fid", "--out", str(tmp_path / "tables")])
    table = (tmp_path / "tables" / "fid-by-paper.source.md").read_text().splitlines()
    assert table[0] == "| source | fid | paper |"
    for recipe, paper in RECIPES.items():
        source = compose_config([f"experiment={recipe}"]).paper.source
        assert f"| {source} | 9.99 | {paper['fid']:.4g} |" in table
