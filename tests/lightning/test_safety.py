"""Safety and data loss: a checkpoint whose pickle runs code is refused everywhere a file is read, a full disk is named
as such, damaged images are found at set-up in folders and zips alike, and a run directory trains one run at a time."""

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import FAST, compose_config
from lightning_diffusion.lightning import artifacts
from lightning_diffusion.lightning.checkpoints import (AtomicCheckpointIO, load_first_stage, load_model,
                                                       read_checkpoint, resolve_ckpt_path)
from lightning_diffusion.lightning.convert.imported import load_weights
from lightning_diffusion.lightning.evaluation import checkpoint_has_ema
from lightning_diffusion.train import train

TINY = FAST + ["network.channels=16", "callbacks.final_samples=null", "callbacks.sample_grid=null", "grid.steps=5"]


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


@pytest.mark.parametrize("reader", ["load_model", "checkpoint_has_ema", "load_weights", "load_first_stage",
                                    "resolve_ckpt_path"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_never_runs(reader, run_dir, tmp_path):
    """sample / evaluate (load_model, checkpoint_has_ema), init_from (load_weights), first_stage.ckpt_path and resume:
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
            "load_weights": lambda path: load_weights(torch.nn.Linear(1, 1), path),
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
