"""Safety and data loss: a checkpoint whose pickle runs code is refused everywhere a file is read, a full disk is named
as such, damaged images are found at set-up in folders and zips alike, and a run directory trains one run at a time."""

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers import TINY, compose_config, entry_point_env
from lightning_diffusion.lightning import artifacts
from lightning_diffusion.lightning.checkpoints import (AtomicCheckpointIO, init_from, load_first_stage, load_model,
                                                       read_checkpoint, resolve_ckpt_path, run_lock)
from lightning_diffusion.lightning.data import ImageDataModule
from lightning_diffusion.lightning.data.zip import ZipDataModule
from lightning_diffusion.lightning.errors import ConfigError
from lightning_diffusion.lightning.evaluation import checkpoint_has_ema
from lightning_diffusion.train import train

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(TINY, run_dir))
    return run_dir


# ---- 6. a checkpoint is read weights-only wherever it is read -----------------------------------------------------
class WritesMarker:
    """Unpickled, it creates the file `marker`: what a checkpoint with code in its pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_training_checkpoint_reads_weights_only_with_everything_lightning_stores(run_dir):
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "datamodule_hyper_parameters",
            "current_model_state"} <= set(checkpoint)
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint_has_ema(run_dir / "checkpoints" / "last.ckpt")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("reader", ["load_model", "checkpoint_has_ema", "init_from", "load_first_stage",
                                    "resolve_ckpt_path"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_never_runs(reader, run_dir, tmp_path):
    """sample / evaluate (load_model, checkpoint_has_ema), init_from, first_stage.ckpt_path and resume:
    the file is refused naming it, and the code in it never ran."""
    run = tmp_path / "downloaded"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "pwned"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["payload"] = WritesMarker(marker)
    evil = run / "checkpoints" / "evil.ckpt"
    torch.save(checkpoint, evil)
    if reader == "load_first_stage":  # a run that claims to be an autoencoder's, so the file itself is read
        cfg = OmegaConf.load(run / "config.yaml")
        cfg.model._target_ = "lightning_diffusion.lightning.models.AutoencoderModel"
        OmegaConf.save(cfg, run / "config.yaml")
    read = {"load_model": load_model, "checkpoint_has_ema": checkpoint_has_ema, "load_first_stage": load_first_stage,
            "init_from": lambda path: init_from(torch.nn.Linear(1, 1), OmegaConf.merge(OmegaConf.load(run / "config.yaml"),
                                                                                         {"init_from": str(path)})),
            "resolve_ckpt_path": lambda path: resolve_ckpt_path(str(path), run)}[reader]
    with pytest.raises(ValueError, match=rf"{evil} holds pickled Python objects.*GLOBAL .*open.*refused"):
        read(evil)
    assert not marker.exists()


def test_no_weights_only_false_in_the_package():
    package = Path(__file__).resolve().parents[2] / "lightning_diffusion"
    found = subprocess.run(["grep", "-rn", "weights_only=False", str(package)], capture_output=True, text=True).stdout
    assert found == "", found


# ---- 9. a full disk is named as such ----------------------------------------------------------------------------
def to_full_disk(file, mode="r"):
    """`open` whose writes go to /dev/full, the kernel's always-full device: the ENOSPC a full disk gives."""
    return open("/dev/full" if "w" in mode else file, mode)


def test_a_full_disk_is_named_with_its_device_and_the_file_and_the_previous_checkpoint_survives(monkeypatch, tmp_path):
    """torch.save meets ENOSPC; on main it said "RuntimeError: ... unexpected pos 64 vs 0"."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    monkeypatch.setattr(artifacts, "open", to_full_disk, raising=False)
    with pytest.raises(OSError) as raised:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}, path)
    assert raised.value.errno == errno.ENOSPC
    df = subprocess.run(["df", "-P", str(tmp_path)], capture_output=True, text=True).stdout.splitlines()[1].split()
    device, mount = df[0], df[-1]
    assert f"no space left on {device} (mounted at {mount}) writing {path}" in str(raised.value)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_a_full_disk_is_named_by_the_writers_of_results(monkeypatch, tmp_path):
    """metrics.json and the samples' .npz: the same message, naming the file."""
    monkeypatch.setattr(artifacts, "open", to_full_disk, raising=False)
    with pytest.raises(OSError, match=rf"no space left on .* writing {tmp_path / 'metrics.json'}"):
        artifacts.save_json(tmp_path / "metrics.json", {"fid": 1.0} | {f"k{i}": i for i in range(10_000)})
    with pytest.raises(OSError, match=rf"no space left on .* writing {tmp_path / 'samples.npz'}"):
        artifacts.save_npz(tmp_path / "samples.npz", samples=torch.zeros(100_000))


# ---- 10. images: one reader for folders and zips, and a set-up scan that decodes -------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_zlib(png: bytes) -> bytes:
    """The PNG with its IDAT's deflate stream made invalid (a block of reserved type 3) and the chunk CRC recomputed:
    every chunk checks, only decoding fails."""
    at = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[at:at + 4])[0]
    data = png[at + 8:at + 8 + 2] + b"\xff" * (length - 2)  # the zlib header kept, the stream garbage
    chunk = b"IDAT" + data
    return png[:at] + struct.pack(">I", length) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[at + 12 + length:]


def write_zip(path: Path, images: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in images.items():
            z.writestr(name, data)
        z.writestr("dataset.json", json.dumps({"labels": None}))
    return path


DEEP = (1000, 40000)  # 16-bit grey levels: -0.969 and 0.221 in [-1, 1]; clipped to 8 bits both were white


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16_bit_grey_reads_the_same_from_a_folder_and_a_zip(mode, tmp_path):
    images = {f"{v}.png": png_bytes(np.full((8, 8), v, dtype=np.uint16)) for v in DEEP}
    (tmp_path / "folder").mkdir()
    for name, data in images.items():
        (tmp_path / "folder" / name).write_bytes(data)
    folder = ImageDataModule(path=str(tmp_path / "folder"), image_size=8, mode=mode, val_fraction=0.0,
                             cache_dir=str(tmp_path / "cache"))
    folder.setup("fit")
    zipped = ZipDataModule(str(write_zip(tmp_path / "deep.zip", images)), mode=mode, val_fraction=0.0)
    zipped.setup("fit")
    for data in (folder, zipped):
        x = torch.stack([data.train_dataset.dataset[i][0] for i in range(2)])
        assert x.shape == (2, len(mode), 8, 8)
        got = sorted(x.mean((1, 2, 3)).tolist())
        assert got == pytest.approx([2 * v / 65535 - 1 for v in DEEP], abs=1e-6)
        assert torch.equal(x.amin((1, 2, 3)), x.amax((1, 2, 3)))  # every pixel and channel the same
    small = ZipDataModule(str(tmp_path / "deep.zip"), image_size=4, mode=mode, val_fraction=0.0).load()
    assert float(small[0][0].mean()) == pytest.approx(2 * DEEP[0] / 65535 - 1, abs=1e-6)  # resized, same grey


def test_a_truncated_png_in_a_zip_is_refused_at_set_up_naming_the_entry(tmp_path):
    good = png_bytes(np.full((8, 8), 100, dtype=np.uint8))
    path = write_zip(tmp_path / "data.zip", {"00000/img00000000.png": good,
                                             "00000/img00000001.png": good[: len(good) // 2],
                                             "00000/img00000002.png": corrupt_zlib(good)})
    data = ZipDataModule(str(path), mode="L")
    with pytest.raises(ValueError, match=r"2 of 3 images of .*data.zip cannot be read: 00000/img00000001.png: "
                                         r".*00000/img00000002.png: .*data.damaged=skip"):
        data.setup("fit")
    skipping = ZipDataModule(str(path), mode="L", val_fraction=0.0, damaged="skip")
    with pytest.warns(UserWarning, match="left out 2 of 3 images"):
        skipping.setup("fit")
    assert len(skipping.train_dataset) == 1


def test_a_png_with_a_corrupt_zlib_stream_under_valid_crcs_is_refused_at_set_up_naming_the_file(tmp_path):
    good = png_bytes(np.full((8, 8, 3), 100, dtype=np.uint8))
    with Image.open(io.BytesIO(corrupt_zlib(good))) as im:
        im.verify()  # every chunk and CRC is fine: what the old scan checked
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "fine.png").write_bytes(good)
    (tmp_path / "images" / "broken.png").write_bytes(corrupt_zlib(good))
    data = ImageDataModule(path=str(tmp_path / "images"), image_size=8, val_fraction=0.0,
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"1 of 2 images of .* cannot be read: .*broken\.png: "):
        data.setup("fit")


# ---- 8. a signal during the final samples ----------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_during_the_final_samples_of_the_main_job_stops_it_within_seconds(tmp_path):
    """The main job shrunk to 4 steps and 200 final samples (100 guided network evaluations of ~1 s each here):
    SIGTERM once they start exits 128 + 15 within seconds, last.ckpt whole at the last step. On main the signal was
    ignored until the sampling ended."""
    env = entry_point_env(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    args = [sys.executable, "-m", "lightning_diffusion.train", f"hydra.run.dir={tmp_path}", "logger=csv",
            "trainer.enable_progress_bar=false", "trainer.max_steps=4", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", "callbacks.sample_grid=null", "callbacks.final_samples.n_per_class=20"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the job's own line when final sampling starts
        lines.append(line)
        if "final samples: drawing 200" in line:
            break
    assert proc.poll() is None, "".join(lines[-40:])
    time.sleep(1.0)  # well inside the sampling
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    waited = time.monotonic() - sent
    assert code == 128 + signal.SIGTERM, proc.stdout.read()[-3000:]
    assert waited < 10, f"stopped {waited:.1f} s after the signal"
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not (tmp_path / "samples" / "final.npz").exists()


# ---- 7. one training per run directory --------------------------------------------------------------------------
HOLD = """import sys, time
from lightning_diffusion.lightning.checkpoints import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(run_dir, **env):
    """Another process holding the run directory's lock, as a training in it does (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=entry_point_env(**env))
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_training_into_a_run_dir_is_refused_naming_the_holder_then_taken_over_when_it_died(monkeypatch,
                                                                                                     tmp_path):
    """Another process holds the lock (a training of SLURM job 4242): a training here is refused before it touches
    the folder; the same job requeued takes the lock over; once the holder is killed, a training takes it over."""
    proc = holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by a training run: PID {proc.pid} on host "
                                              rf"{socket.gethostname()} .*SLURM job 4242.*hydra.run.dir="):
            train(compose_config(TINY, tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]  # nothing else touched
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued (its first node may still hold the lock)
        with run_lock(tmp_path):
            assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
        monkeypatch.delenv("SLURM_JOB_ID")
    finally:
        proc.kill()  # SIGKILL: no last words, but the kernel drops its lock
        proc.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))  # as it left it
    train(compose_config(TINY, tmp_path))
    assert (tmp_path / "train.lock").read_text() == ""  # released when the training ended
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_lock_file_of_a_dead_process_is_taken_over_without_flock(monkeypatch, tmp_path):
    """On a filesystem without flock the record decides: a live PID on this host holds, a dead one is stale."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    ended = subprocess.Popen(["true"])
    ended.wait()
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive: pytest's parent
    with pytest.raises(ConfigError, match=rf"PID {os.getppid()} on host {socket.gethostname()}"):
        with run_lock(tmp_path):
            pass
    lock.write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname()}))
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""
