"""Faults and bad input, one test per defect found from outside: nothing a user did is lost, nothing wrong runs."""

import io
import shutil
import subprocess
import sys

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import FAST, TINY, compose_config, entry_point_env
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.lightning.checkpoints import resolve_ckpt_path
from lightning_diffusion.lightning.data import ImageDataModule
from lightning_diffusion.lightning.loggers import run_id
from lightning_diffusion.train import train

# ---- a run directory remembers what it trained -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddpm")
    train(compose_config(TINY, run_dir))
    return run_dir


@pytest.mark.parametrize("overrides, changed", [
    (["model=edm"], r"model\.process\._target_: .*processes\.ddpm' -> .*EDMProcess"),
    (["model=flow"], r"model\.parameterization\._target_"),
    (["data=digits16", "network.attn_resolutions=[8]"], r"data\.image_size: 8 -> 16"),
])
def test_a_checkpoint_of_another_family_or_data_is_refused(ddpm_run, overrides, changed, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(ddpm_run, copy)
    before = (copy / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=f"holds a run of another configuration than this one: .*{changed}.*"
                                          "ckpt_path=null"):
        train(compose_config(TINY + overrides + ["trainer.max_steps=6"], copy))
    assert (copy / "config.yaml").read_text() == before  # refused before the run directory was touched
    metrics = train(compose_config(TINY + overrides + ["trainer.max_steps=2", "ckpt_path=null"], copy))
    assert metrics["train/loss"] > 0  # the explicit fresh start trains


def test_a_resume_keeps_the_csv_history(ddpm_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(ddpm_run, copy)
    train(compose_config(TINY + ["trainer.max_steps=7"], copy))
    steps = pd.read_csv(copy / "csv" / "metrics.csv").dropna(subset=["train/loss"])["step"].astype(int).tolist()
    assert sorted(steps) == list(range(7))  # 0..3 from the first run, 4..6 from the resumed one, each once


def test_a_moved_run_dir_resumes_from_its_newest_checkpoint_by_content(ddpm_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(ddpm_run, moved)  # as `mv A B`: the checkpoint's callback state names the old folder
    train(compose_config(TINY + ["trainer.max_steps=6"], moved))
    train(compose_config(TINY + ["trainer.max_steps=8"], moved))
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    # found by content: a stale last.ckpt beside a newer last-v1.ckpt (as old versions left them)
    stale = torch.load(ddpm_run / "checkpoints" / "last.ckpt", weights_only=False)
    shutil.copy(moved / "checkpoints" / "last.ckpt", moved / "checkpoints" / "last-v1.ckpt")
    torch.save(stale, moved / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", moved) == str(moved / "checkpoints" / "last-v1.ckpt")


def test_max_steps_zero_only_samples_a_given_checkpoint(ddpm_run, tmp_path):
    """max_steps=0 with a checkpoint: nothing trained, its final samples drawn (sweeps/sampler_x_nfe.yaml); without
    one: refused before anything is built, saying what it would mean."""
    with pytest.raises(ConfigError, match=r"trainer.max_steps=0 trains nothing: with ckpt_path=<a checkpoint>"):
        train(compose_config(TINY + ["trainer.max_steps=0"], tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "config.yaml").exists()
    cfg = compose_config(FAST + ["network.channels=16", "trainer.max_steps=0", "callbacks.ema=null", "grid.steps=5",
                                 "callbacks.final_samples.n_per_class=1", "callbacks.checkpoint=null",
                                 f"ckpt_path={ddpm_run / 'checkpoints' / 'last.ckpt'}"], tmp_path / "trial")
    metrics = train(cfg)
    assert metrics["final/nfe"] == 5 and metrics["final/num_samples"] == 10 and "train/loss" not in metrics


def test_a_directory_given_as_ckpt_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"ckpt_path={tmp_path} is a directory: give a checkpoint file"):
        resolve_ckpt_path(str(tmp_path), tmp_path)


def test_every_resume_continues_the_run_directorys_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = run_id(tmp_path)
    assert run_id(tmp_path) == first and len(first) == 8 and (tmp_path / "wandb_run_id").read_text() == first
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun")  # under `wandb agent` the agent's id is the run's
    assert run_id(tmp_path / "other") == "agentrun"
    monkeypatch.delenv("WANDB_RUN_ID")
    logger = compose_config([], tmp_path).logger.wandb
    assert logger.resume == "allow" and logger.id == first


# ---- W&B degrades, never kills ----------------------------------------------------------------------------------
SERVER = """
import http.server, socket, sys, time
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.fail()
    def do_POST(self): self.fail()
    def fail(self):
        if sys.argv[1] == "silent": time.sleep(600)
        self.send_response(503); self.end_headers(); self.wfile.write(b"unavailable")
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""
LOG = """
import sys, time
from lightning_diffusion.lightning.loggers import WandbLogger
start = time.monotonic()
logger = WandbLogger(project="p", save_dir=sys.argv[1], id="faulty01", resume="allow", init_timeout=5)
logger.log_metrics({"x": 1.0}, step=0)
logger.experiment.finish()
print("ELAPSED", time.monotonic() - start, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("server", ["503", "silent"])
def test_a_wandb_server_that_answers_but_fails_turns_the_run_offline(server, tmp_path):
    """WANDB_MODE=online, a key, a server answering 503 (or never answering): the run logs offline after the
    init timeout (5 s here, 20 s by default) instead of failing after W&B's ~2 minutes, and says how to sync."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, server], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        env = entry_point_env(WANDB_MODE="online", WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}",
                              WANDB_SILENT="true")
        done = subprocess.run([sys.executable, "-c", LOG, str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=240)
    finally:
        proc.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logging offline" in done.stderr and "wandb sync" in done.stderr
    elapsed = float(done.stdout.split("ELAPSED")[1])
    assert elapsed < 60, elapsed
    assert list((tmp_path / "wandb").glob("offline-run-*faulty01"))


# ---- nonsense is refused before compute --------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.lr_warmup_steps=-10", r"model\.lr_warmup_steps=-10: need an int >= 0"),
    ("callbacks.ema.half_life_steps=nan", r"callbacks\.ema\.half_life_steps=nan"),
    ("guidance_scale=nan", r"guidance_scale=nan"),
    ("guidance_scale=inf", r"guidance_scale=inf: need null .* or a finite number"),
    ("grid.steps=0", r"grid\.steps=0: need an int >= 1"),
    ("trainer.max_steps=inf", r"trainer\.max_steps=inf: .*Trainer's max_steps takes int"),
    ("callbacks.checkpoint.every_n_train_steps=[]", r"callbacks\.checkpoint\.every_n_train_steps=\[\]"),
    ("trainer.max_steps=-3", r"trainer\.max_steps=-3: need -1 or 0 or an int >= 1"),
    ("model.optimizer.lr=0", r"model\.optimizer\.lr=0: need a number in \(0, 10\)"),
    ("model.learned_variance={}", r"model\.learned_variance=\{\}: .*takes bool"),
    ("model.learned_variance='no'", r"model\.learned_variance='no': .*takes bool"),
    ("model.learned_variance=1e12", r"model\.learned_variance=1000000000000\.0: .*takes bool"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0: need"),
    ("seed=-1", r"seed=-1: need an int in \[0, 4294967295\]"),
    ("model.process.T=1.5", r"model\.process\.T=1\.5: .*ddpm's T takes int"),
])
def test_nonsense_values_are_refused_before_compute(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(compose_config([override, "logger=csv"], tmp_path))


@pytest.mark.parametrize("overrides, message", [
    (["experiment=autoencoder", "callbacks=posthoc_ema"], r"callbacks=posthoc_ema .* model=autoencoder builds"),
    (["callbacks=autoencoder"], r"callbacks=autoencoder .*ReconstructionGrid.* model=ddpm builds DiffusionModel"),
    (["model=edm", "sampler=ancestral"], r"model=edm.*sampler=ancestral, grid=strided.*strided_times needs"),
    (["data=moons"], r"network=unet_tiny cannot serve data=moons \(samples of shape \(2,\)\)"),
])
def test_valid_group_choices_that_cannot_pair_are_refused_naming_both(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(compose_config(overrides + ["logger=csv"], tmp_path))


# ---- images: damaged found before training, bit depths above 8 -------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root, n=6, damage=()):
    root.mkdir(parents=True)
    for i in range(n):
        path = root / f"{i}.png"
        data = png_bytes(np.full((8, 8, 3), 20 * i, dtype=np.uint8))
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image"}.get(
            dict(damage).get(i), data))
    return root


def test_16_bit_greyscale_pngs_keep_their_values(tmp_path):
    """A 16-bit PNG of value 1000 / 65535 is -0.969 in [-1, 1], not white (RGB conversion clipped it to 255)."""
    folder = tmp_path / "deep"
    folder.mkdir()
    for value in (1000, 40000):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(folder / f"{value}.png")
    dm = ImageDataModule(path=str(folder), image_size=8, mode="L", val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    got = sorted(float(dm.train_dataset[i][0].mean()) for i in range(2))
    assert got == pytest.approx([2 * 1000 / 65535 - 1, 2 * 40000 / 65535 - 1], abs=1e-6)


def test_damaged_images_are_all_named_at_set_up_or_skipped_with_a_count(tmp_path):
    folder = write_folder(tmp_path / "images", damage=[(1, "truncated"), (3, "empty"), (4, "text")])
    dm = ImageDataModule(path=str(folder), image_size=8, val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"3 of 6 images .* cannot be read: .*1\.png.*3\.png.*4\.png.*data\.damaged=skip"):
        dm.setup("fit")
    dm = ImageDataModule(path=str(folder), image_size=8, val_fraction=0.0, damaged="skip",
                         cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match="left out 3 of 6 images"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 3 and all(torch.isfinite(dm.train_dataset[i][0]).all() for i in range(3))


def test_validation_can_come_from_another_split(tmp_path):
    images = [png_bytes(np.full((8, 8, 3), v, dtype=np.uint8)) for v in range(5)]
    rows = {"image": [{"bytes": b, "path": None} for b in images], "label": [0, 1, 0, 1, 0]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict(rows, features=features) for name in ("train", "test")})
    splits["test"] = splits["test"].select(range(2))
    splits.save_to_disk(tmp_path / "saved")
    dm = ImageDataModule(path=str(tmp_path / "saved"), image_size=8, val_split="test", val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_tensor()) == 5 and len(dm.val_dataset) == 2  # every training image trains
    with pytest.raises(ValueError, match="val_split='test' and val_fraction=0.01: .*not both"):
        ImageDataModule(path=str(tmp_path / "saved"), val_split="test")


def test_a_hub_data_set_offline_is_refused_before_the_network(monkeypatch, tmp_path):
    """data=cifar10 offline with the default network: the offline message (naming data.path), not the network's
    attention setting that cannot fit 32x32 images."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(ConfigError, match=r"cannot load the Hub dataset name='uoft-cs/cifar10'.*data\.path="):
        build(compose_config(["data=cifar10", "logger=csv", f"data.cache_dir={tmp_path / 'c'}"], tmp_path))
