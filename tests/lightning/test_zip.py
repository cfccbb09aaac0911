"""EDM's zip data format: a zip of PNGs + dataset.json, read lazily, checked, trained on.

The zips here are written the way EDM's dataset_tool.py writes them (`00000/img00000000.png`, labels as
[[name, class], ...] or null) from the 8x8 digits, so every decoded pixel can be compared with the source.
"""

import json
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAST, compose_config, write_edm_zip
from lightning_diffusion.lightning.data import DigitsDataModule, from_uint8, to_uint8
from lightning_diffusion.lightning.data.zip import ZipDataModule, ZipImages, adm_center_crop
from lightning_diffusion.train import train


@pytest.fixture(scope="module")
def digits():
    x, y = DigitsDataModule().train_tensor(labels=True)
    return x[:64], y[:64]


def test_a_labelled_zip_reads_back_every_pixel_and_label_lazily(tmp_path, digits):
    x, y = digits
    path, _ = write_edm_zip(tmp_path / "digits.zip", x, y.tolist())
    data = ZipDataModule(str(path), mode="L", val_fraction=0.0)
    assert data.shape == (1, 8, 8) and data.num_classes == int(y.max()) + 1
    dataset = data.load()
    assert dataset._zip is None  # nothing opened until an image is drawn
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    torch.testing.assert_close(torch.stack(xs), from_uint8(to_uint8(x)), rtol=0, atol=0)
    assert torch.equal(torch.stack(ys), y)
    assert pickle.loads(pickle.dumps(dataset))._zip is None  # a DataLoader worker opens its own handle


def test_an_unlabeled_zip_has_no_classes(tmp_path, digits):
    path, _ = write_edm_zip(tmp_path / "digits.zip", digits[0], None)
    data = ZipDataModule(str(path), mode="L")
    assert data.num_classes == 0 and int(data.load()[3][1]) == 0


def test_training_runs_a_few_steps_from_a_zip(tmp_path, digits):
    path, _ = write_edm_zip(tmp_path / "digits.zip", *digits[:1], digits[1].tolist())
    metrics = train(compose_config(FAST + ["data=edm_zip", f"data.path={path}", "data.mode=L", "data.batch_size=16",
                                           "trainer.max_steps=2", "network.channels=16", "grid.steps=4"], tmp_path / "run"))
    assert math.isfinite(metrics["train/loss"]) and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_adm_center_crop_box_halves_then_crops_the_middle():
    # 64 x 32 with a white middle band 32 wide: two box halvings (-> 16 x 8), then the middle 8 x 8 is all white
    image = np.zeros((32, 64), np.uint8)
    image[:, 16:48] = 255
    out = adm_center_crop(Image.fromarray(image), 8)
    assert out.size == (8, 8) and np.asarray(out).min() == 255
    flat = adm_center_crop(Image.fromarray(np.full((30, 50), 77, np.uint8)), 8)  # bicubic of a constant is constant
    assert flat.size == (8, 8) and (np.asarray(flat) == 77).all()


def test_images_of_another_size_are_brought_to_image_size(tmp_path, digits):
    path, _ = write_edm_zip(tmp_path / "digits.zip", digits[0], None)
    data = ZipDataModule(str(path), image_size=4, mode="RGB", crop="resize")
    assert data.shape == (3, 4, 4) and data.load()[0][0].shape == (3, 4, 4)


@pytest.mark.parametrize("case, error", [
    ("not_a_zip", r"is not a zip file"),
    ("no_json", r"has no dataset.json: not an EDM dataset zip"),
    ("bad_json", r"dataset.json must be"),
    ("absent_entry", r"labels the entry '00009/ghost.png', which is not an image in the zip"),
    ("unlabeled_image", r"the image '00000/img00000063.png' has no label"),
    ("out_of_range", r"the label 12 of '00000/img00000005.png' is outside 0..9 \(data.num_classes=10\)"),
    ("negative", r"the label -1 of '00000/img00000005.png' is not a class index"),
    ("boolean", r"the label True of '00000/img00000005.png' is not a class index"),
])
def test_bad_zips_are_refused_naming_the_entry(tmp_path, digits, case, error):
    x, y = digits
    labels = [int(v) % 10 for v in y]
    path = tmp_path / "bad.zip"
    if case == "not_a_zip":
        path.write_bytes(b"not a zip")
    elif case == "no_json":
        write_edm_zip(path, x, labels, json_labels=None)
    elif case == "bad_json":
        write_edm_zip(path, x, labels, json_labels=None)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("dataset.json", "{labels: oops")
    else:
        _, names = write_edm_zip(path, x, labels, json_labels=None)
        entries = [[n, v] for n, v in zip(names, labels)]
        if case == "absent_entry":
            entries.append(["00009/ghost.png", 1])
        elif case == "unlabeled_image":
            entries.pop()
        else:
            entries[5][1] = {"out_of_range": 12, "negative": -1, "boolean": True}[case]
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("dataset.json", json.dumps({"labels": entries}))
    with pytest.raises(ValueError, match=error):
        ZipDataModule(str(path), mode="L", num_classes=10)


def test_a_truncated_png_is_refused_naming_its_entry(tmp_path, digits):
    """When drawn (the set-up scan refuses it earlier: test_safety), e.g. an image damaged after set-up."""
    path, names = write_edm_zip(tmp_path / "digits.zip", digits[0], None, truncate=7)
    dataset = ZipImages(str(path), names, None, 8, "L", "adm")
    dataset[6]
    with pytest.raises(ValueError, match=r"cannot read the image '00000/img00000007.png' in .*digits.zip"):
        dataset[7]


def test_bad_arguments_are_refused_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='.*missing.zip' does not exist"):
        ZipDataModule(str(tmp_path / "missing.zip"))
    with pytest.raises(ValueError, match=r"crop='square': accepted \['adm', 'resize'\]"):
        ZipDataModule(str(tmp_path / "missing.zip"), crop="square")
