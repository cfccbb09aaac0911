"""The shared DataModules: configs, determinism, scaling, splits under DDP, image sources, and bad input."""

import math
import pickle
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DistributedSampler

from lightning_diffusion.lightning.data import (TOYS, DigitsDataModule, GaussianMixtureDataModule, ImageDataModule,
                                      ToyDataModule, from_uint8, to_uint8)
from lightning_diffusion.lightning.data.base import HFlip

from helpers import CONF, write_edm_zip

DATA_CONFIGS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _png_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(12, 10)) -> Path:
    """Class sub-folders of small PNGs; each image is one grey level (its index) so decoding can be checked."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            level = 40 * c + 10 * i
            mode = ("RGB", "L", "RGBA")[i % 3]  # mixed modes, all converted to the configured one
            Image.new(mode, size, (level,) * len(mode) if mode != "L" else level).save(root / name / f"{i}.png")
    return root


def _arrow_images(n: int, labels: list[int] | None, class_label: bool) -> datasets.Dataset:
    """An in-memory datasets.Dataset of n 6x6 PNG images with an optional label column."""
    cols = {"image": [Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)) for i in range(n)]}
    feats = {"image": datasets.Image()}
    if labels is not None:
        cols["label"] = labels
        feats["label"] = datasets.ClassLabel(num_classes=3) if class_label else datasets.Value("int64")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


# --- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [c for c in DATA_CONFIGS if c != "latents"])  # latents: test_latents.py
def test_every_data_config_instantiates_with_cheap_attributes(config, tmp_path):
    overrides = [f"+data={config}"]
    if config == "image_folder":
        overrides.append(f"data.path={_png_folder(tmp_path / 'imgs')}")
    if config == "edm_zip":
        write_edm_zip(tmp_path / "d.zip", torch.zeros(3, 1, 4, 4), [0, 1, 1])
        overrides.append(f"data.path={tmp_path / 'd.zip'}")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=overrides)
    for key in ("batch_size", "num_workers", "seed", "val_fraction"):
        assert key in cfg.data, f"{config}.yaml lacks {key}"
    assert cfg.data.num_workers == 0
    dm = instantiate(cfg.data)  # no data are touched: Hub configs construct offline
    assert isinstance(dm, L.LightningDataModule) and dm.train_dataset is None
    assert isinstance(dm.num_classes, int) and dm.num_classes >= 0
    assert all(isinstance(s, int) and s > 0 for s in dm.shape)


def test_toy_configs_cover_every_toy():
    assert set(TOYS) <= set(DATA_CONFIGS)


# --- toys and the Gaussian-mixture oracle ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_is_seeded_unit_scale_and_unlabeled(name):
    dm = ToyDataModule(name, num_samples=4000, seed=3)
    x = dm.train_tensor()
    assert dm.shape == (2,) and dm.num_classes == 0 and x.shape == (3600, 2) and x.dtype == torch.float32
    assert torch.equal(x, ToyDataModule(name, num_samples=4000, seed=3).train_tensor())
    assert not torch.allclose(x[:100], ToyDataModule(name, num_samples=4000, seed=4).train_tensor()[:100])
    assert x.mean(0).abs().max() < 0.1
    assert 0.6 < x.std(0).min() and x.std(0).max() < 1.3
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (256, 2) and yb.dtype == torch.long and (yb == 0).all()


def _near_circle(x, centre, radius, tol):
    return ((x - torch.tensor(centre)).norm(dim=1) - radius).abs() < tol


# each toy's defining property, checked on the data with its scaling undone
TOY_PROPERTIES = {
    "moons": lambda x: (_near_circle(x * 0.72 + torch.tensor([0.5, 0.25]), (0.0, 0.0), 1, 0.25)
                        | _near_circle(x * 0.72 + torch.tensor([0.5, 0.25]), (1.0, 0.5), 1, 0.25)).all(),
    "swiss_roll": lambda x: ((x * 6.8 + torch.tensor([2.0, 0.2])).norm(dim=1) > 3).all(),  # the roll has a hole
    "eight_gaussians": lambda x: (torch.cdist(x, math.sqrt(2) * torch.stack(
        [torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1)).min(1).values
        < 0.5).all(),
    "checkerboard": lambda x: ((x * 2 / math.sqrt(3)).floor().sum(1) % 2 == 0).all(),  # black squares only
}


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_has_its_shape(name):
    x = ToyDataModule(name, num_samples=2000).train_tensor()
    assert TOY_PROPERTIES[name](x)
    assert not all(TOY_PROPERTIES[other](x) for other in TOYS if other != name)


def test_unknown_toy_name_raises():
    with pytest.raises(ValueError, match=r"unknown toy name='spiral'.*moons"):
        ToyDataModule("spiral")


def test_gaussian_mixture_data_follow_the_oracle():
    dm = GaussianMixtureDataModule(num_modes=8, radius=2.0, std=0.1, num_samples=4000, seed=1)
    x = dm.train_tensor().double()
    assert dm.oracle.means.shape == (8, 2)
    assert torch.allclose(dm.oracle.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    # every point lies near a mode, and each mode holds about 1/8 of them
    d = torch.cdist(x, dm.oracle.means)
    assert d.min(1).values.max() < 0.6
    counts = torch.bincount(d.argmin(1), minlength=8).double() / len(x)
    assert (counts - 1 / 8).abs().max() < 0.03
    # average log-density equals the oracle's on its own fresh samples (the negative entropy)
    fresh = dm.oracle.sample(4000, torch.Generator().manual_seed(99))
    assert abs(float(dm.oracle.log_prob(x).mean() - dm.oracle.log_prob(fresh).mean())) < 0.1
    # sigma_data: per-coordinate variance is r^2 / 2 + std^2
    assert dm.data_std() == pytest.approx(math.sqrt(2.0 + 0.01), rel=0.03)


# --- digits ---------------------------------------------------------------------------------------------

def test_digits_are_the_sklearn_images_in_minus_one_one():
    dm = DigitsDataModule(val_fraction=0.1, seed=0)
    assert dm.shape == (1, 8, 8) and dm.num_classes == 10
    dm.setup("fit")
    x, y = dm.train_tensor(labels=True)
    xv = torch.stack([dm.val_dataset[i][0] for i in range(len(dm.val_dataset))])
    assert len(x) + len(xv) == 1797 and x.shape[1:] == (1, 8, 8)
    assert x.min() == -1 and x.max() == 1 and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    # train row j is sklearn image perm[j]: pixels (x + 1) * 8 recover the [0, 16] counts
    digits = load_digits()
    rows = torch.as_tensor(dm.train_dataset.indices)
    assert torch.allclose((x[:, 0] + 1) * 8, torch.from_numpy(digits.images[rows]).float(), atol=1e-5)
    assert torch.equal(y, torch.from_numpy(digits.target[rows]).long())
    assert not isinstance(dm.train_dataset, HFlip)  # hflip is off for digits


def test_digits_resized_to_16_keep_range_and_mean():
    dm8, dm16 = DigitsDataModule(), DigitsDataModule(image_size=16)
    x8, x16 = dm8.train_tensor(), dm16.train_tensor()
    assert dm16.shape == (1, 16, 16) and x16.shape[1:] == (1, 16, 16)
    assert x16.min() >= -1 and x16.max() <= 1
    assert torch.allclose(x16.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.02)
    # the same digits in the same order: 2x2 average pooling lands near its own 8x8 image, far from its neighbour's
    pooled = torch.nn.functional.avg_pool2d(x16, 2)
    assert (pooled - x8).abs().mean() < 0.2 < (pooled - x8.roll(1, 0)).abs().mean()


# --- the DataModule contract -------------------------------------------------------------------------------

def test_split_is_seeded_disjoint_and_covering():
    a, b, c = (GaussianMixtureDataModule(num_samples=1000, seed=s, val_fraction=0.2) for s in (5, 5, 6))
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.train_dataset.indices == b.train_dataset.indices and a.val_dataset.indices == b.val_dataset.indices
    assert a.train_dataset.indices != c.train_dataset.indices
    assert len(a.val_dataset) == 200
    assert sorted(a.train_dataset.indices + a.val_dataset.indices) == list(range(1000))


@pytest.mark.parametrize("n_train", [800, 801])
def test_ddp_shards_are_disjoint_and_cover_the_train_split(n_train):
    """Two ranks as Lightning shards them: DistributedSampler(shuffle=True, seed) over the train dataset."""
    dm = GaussianMixtureDataModule(num_samples=n_train + 100, val_fraction=100 / (n_train + 100), seed=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == n_train
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == math.ceil(n_train / 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n_train))
    padding = 2 * math.ceil(n_train / 2) - n_train  # DistributedSampler repeats indices to even the shards
    assert len(set(shards[0]) & set(shards[1])) == padding


def test_batches_are_long_labelled_tuples_through_lightning():
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)
            self.seen = []

        def training_step(self, batch, i):
            assert isinstance(batch, tuple) and batch[1].dtype == torch.long
            self.seen.append(batch[0].shape)
            return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, i):
            self.seen.append(("val", batch[0].shape))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Probe()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert model.seen.count((32, 1, 8, 8)) == 2 and model.seen.count(("val", (32, 1, 8, 8))) == 2


def test_no_validation_split():
    dm = ToyDataModule("moons", num_samples=100, val_fraction=0.0)
    assert dm.val_dataloader() == [] and len(dm.train_dataset) == 100


def test_statistics_and_real_samples():
    dm = ToyDataModule("eight_gaussians", num_samples=500)
    x = dm.train_tensor()
    assert dm.data_std() == pytest.approx(float(x.double().std()))
    assert dm.max_pairwise_distance() == pytest.approx(float(torch.cdist(x.double(), x.double()).max()))
    assert dm.max_pairwise_distance(max_samples=50) <= dm.max_pairwise_distance()
    s = dm.sample_real(100)
    assert s.shape == (100, 2) and torch.equal(s, dm.sample_real(100))
    assert not torch.equal(s, dm.sample_real(100, seed=1))
    assert len(torch.unique(s, dim=0)) == 100
    with pytest.raises(ValueError, match=r"sample_real\(n=451\)"):
        dm.sample_real(451)


def test_to_uint8_inverts_from_uint8():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(from_uint8(u)), u)
    assert from_uint8(u).min() == -1 and from_uint8(u).max() == 1
    assert torch.equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 0, 128, 255, 255]).byte())
    assert torch.equal(DigitsDataModule.to_uint8(torch.zeros(1)), torch.tensor([128]).byte())


@pytest.mark.parametrize("kwargs, match", [
    (dict(val_fraction=1.0), "val_fraction=1.0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(num_samples=1), "num_samples=1"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyDataModule("moons", **kwargs)


# --- image sources -------------------------------------------------------------------------------------------

def test_image_folder_labels_from_subfolders_and_modes_converted(tmp_path):
    root = _png_folder(tmp_path / "imgs", classes=("a_cat", "b_dog", "c_fox"), per_class=4)
    dm = ImageDataModule(path=str(root), image_size=8, mode="RGB", hflip=False, val_fraction=0.25,
                         cache_dir=str(tmp_path / "cache"), batch_size=3)
    assert dm.num_classes == 3 and dm.shape == (3, 8, 8)  # before any loading
    dm.prepare_data()
    dm.setup("fit")
    x, y = dm.train_tensor(labels=True)
    assert x.shape == (9, 3, 8, 8) and y.dtype == torch.long
    # each image is flat grey 40 c + 10 i: the decoded value names its class
    level = torch.round((x[:, 0, 0, 0] + 1) * 127.5)
    assert torch.equal(torch.div(level, 40, rounding_mode="floor").long(), y)
    assert torch.allclose(x, x[:, :1, :1, :1].expand_as(x))  # resized and converted without artefacts
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 8, 8) and yb.dtype == torch.long
    pickle.dumps(dm.train_dataset)  # DataLoader workers receive it


def test_flat_folder_is_unlabeled_and_grey_mode(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(5):
        Image.new("RGB", (20, 10), (10 * i, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    dm = ImageDataModule(path=str(tmp_path / "flat"), image_size=4, mode="L", val_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
    assert dm.num_classes == 0 and dm.shape == (1, 4, 4)
    x, y = dm.train_tensor(labels=True)
    assert x.shape == (4, 1, 4, 4) and (y == 0).all()


def test_hflip_flips_train_samples_only(tmp_path):
    (tmp_path / "one").mkdir()
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 0] = 255  # a bright left column
    Image.fromarray(img).save(tmp_path / "one" / "0.png")
    Image.fromarray(img).save(tmp_path / "one" / "1.png")
    dm = ImageDataModule(path=str(tmp_path / "one"), image_size=4, hflip=True, val_fraction=0.5,
                         cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    left = [bool(dm.train_dataset[0][0][0, 0, 0] > 0) for _ in range(40)]
    assert 5 < sum(left) < 35  # flipped about half the time
    assert all(dm.val_dataset[0][0][0, 0, 0] > 0 for _ in range(10))
    assert (dm.train_tensor()[:, 0, :, 0] > 0).all()  # statistics see unaugmented data


def test_saved_dataset_with_class_labels(tmp_path):
    _arrow_images(6, [0, 1, 2, 0, 1, 2], class_label=True).save_to_disk(str(tmp_path / "saved"))
    dm = ImageDataModule(path=str(tmp_path / "saved"), image_size=6, val_fraction=0.0, hflip=False)
    assert dm.num_classes == 3 and dm.shape == (3, 6, 6)
    x, y = dm.train_tensor(labels=True)
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(to_uint8(x[:, 0, 0, 0]).float().sort().values, 20 * torch.arange(6.0))


def test_saved_dataset_dict_split_and_unlabeled(tmp_path):
    ds = datasets.DatasetDict(train=_arrow_images(4, None, False), test=_arrow_images(2, None, False))
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = ImageDataModule(path=str(tmp_path / "saved"), split="test", label_column=None, image_size=6,
                         val_fraction=0.0)
    assert dm.num_classes == 0 and len(dm.train_tensor()) == 2
    with pytest.raises(ValueError, match=r"column 'label' not in the saved dataset"):
        ImageDataModule(path=str(tmp_path / "saved"), split="test")
    with pytest.raises(ValueError, match=r"split='valid' not in the saved DatasetDict.*\['train', 'test'\]"):
        ImageDataModule(path=str(tmp_path / "saved"), split="valid", label_column=None)


def test_out_of_range_label_names_row_and_value(tmp_path):
    _arrow_images(4, [0, 1, 7, 2], class_label=False).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"set data.num_classes"):
        ImageDataModule(path=str(tmp_path / "saved"))  # plain int labels: the class count must be given
    dm = ImageDataModule(path=str(tmp_path / "saved"), num_classes=3, image_size=6)
    with pytest.raises(ValueError, match=r"label 7 of row 2 .*outside 0\.\.2"):
        dm.setup("fit")


def test_empty_and_mixed_folders_raise(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no images"):
        ImageDataModule(path=str(tmp_path / "empty"))
    mixed = _png_folder(tmp_path / "mixed")
    Image.new("RGB", (4, 4)).save(mixed / "stray.png")
    with pytest.raises(ValueError, match=r"mixes images at the top \('stray.png'"):
        ImageDataModule(path=str(mixed))
    with pytest.raises(ValueError, match=r"is not a directory"):
        ImageDataModule(path=str(tmp_path / "missing"))


def test_unreadable_image_is_named(tmp_path):
    root = _png_folder(tmp_path / "imgs", per_class=2)
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    dm = ImageDataModule(path=str(root), image_size=4, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"cannot be read: .*dog/broken\.png"):
        dm.train_tensor()


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="uoft-cs/cifar10", path="/tmp", num_classes=10), "give exactly one"),
    (dict(), "give exactly one"),
    (dict(name="uoft-cs/cifar10", mode="CMYK", num_classes=10), r"mode='CMYK': accepted"),
    (dict(name="uoft-cs/cifar10"), r"num_classes=None .*set data.num_classes"),
])
def test_bad_image_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


# --- the Hub, offline ----------------------------------------------------------------------------------------

def test_hub_name_fails_at_once_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = datasets.config.HF_HUB_OFFLINE
    dm = ImageDataModule(name="uoft-cs/cifar10", num_classes=10, cache_dir=str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"offline .*data\.path=/path/to/folder_or_saved_dataset"):
        dm.prepare_data()
    assert time.monotonic() - start < 3
    assert datasets.config.HF_HUB_OFFLINE == flags  # the library flags are restored


def test_hub_name_without_network_fails_fast_by_default(monkeypatch, tmp_path):
    """No env var: the quick connection check (not the HTTP client's ~25 s of retries) decides. The Hub endpoint is a
    closed local port, so the test means the same on a machine with internet."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    dm = ImageDataModule(name="lightning-diffusion/does-not-exist", num_classes=2, cache_dir=str(tmp_path / "c"))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"data\.path="):
        dm.setup("fit")
    assert time.monotonic() - start < 5
    assert datasets.config.HF_HUB_OFFLINE is False  # the offline switch was only for that call
